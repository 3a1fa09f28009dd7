"""Real-world image quirks, each made by the test and checked against what a viewer shows."""
import numpy as np
import pytest
from PIL import Image

from encoders.model.images import ImageError, list_images, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _halves(w=8, h=4):
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = RED
    a[:, w // 2:] = BLUE
    return a


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(_halves())
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "phone.png", exif=exif)  # lossless, so pixels compare exactly
    got = np.asarray(load_image(tmp_path / "phone.png"))
    assert got.shape == (8, 4, 3)  # portrait now: red on top, blue below
    assert np.array_equal(got, np.rot90(_halves(), k=-1))


def test_alpha_is_flattened_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)  # transparent black everywhere...
    a[0, 0] = (255, 0, 0, 255)        # ...one opaque red pixel
    a[0, 1] = (255, 0, 0, 128)        # one half-transparent red pixel
    Image.fromarray(a, "RGBA").save(tmp_path / "cutout.png")
    got = np.asarray(load_image(tmp_path / "cutout.png")).astype(int)
    assert tuple(got[0, 0]) == RED and tuple(got[3, 3]) == WHITE
    assert np.abs(got[0, 1] - [255, 127, 127]).max() <= 1  # 0.5 red + 0.5 white
    Image.fromarray(np.stack([np.full((2, 2), 40, np.uint8), np.zeros((2, 2), np.uint8)], -1),
                    "LA").save(tmp_path / "grey_alpha.png")
    assert np.asarray(load_image(tmp_path / "grey_alpha.png")).min() == 255


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (3, 1))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putdata([0, 1, 1])
    p.save(tmp_path / "plain.png")
    assert [tuple(c) for c in np.asarray(load_image(tmp_path / "plain.png"))[0]] == [(0, 0, 0), RED, RED]
    p.save(tmp_path / "transparent.png", transparency=0)  # index 0 (black) is see-through
    assert [tuple(c) for c in np.asarray(load_image(tmp_path / "transparent.png"))[0]] == [WHITE, RED, RED]


def test_cmyk_greyscale_and_16_bit(tmp_path):
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=100)
    got = np.asarray(load_image(tmp_path / "print.jpg")).astype(int)
    assert np.abs(got - RED).max() < 10
    Image.fromarray(np.full((2, 2), 90, np.uint8), "L").save(tmp_path / "grey.png")
    assert np.asarray(load_image(tmp_path / "grey.png")).tolist() == [[[90] * 3] * 2] * 2
    wide = np.array([[0, 32768, 65535]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "scan16.png")
    assert Image.open(tmp_path / "scan16.png").mode.startswith("I")  # really a 16-bit file
    got = np.asarray(load_image(tmp_path / "scan16.png"))
    assert got.shape == (1, 3, 3) and got[0, :, 0].tolist() == [0, 128, 255]  # scaled, not clipped


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in (RED, BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    got = np.asarray(load_image(tmp_path / "anim.gif")).astype(int)
    assert np.abs(got - RED).max() < 10


def test_huge_truncated_and_foreign_files_are_one_line_errors(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="big.png: image larger than 1000 pixels"):
        load_image(tmp_path / "big.png")
    monkeypatch.undo()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png: cannot decode"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "notes.jpg").write_text("shopping list")
    with pytest.raises(ImageError, match="notes.jpg: not an image file"):
        load_image(tmp_path / "notes.jpg")


def test_jpeg_draft_never_goes_below_the_size_hint(tmp_path):
    Image.new("RGB", (1600, 1200), RED).save(tmp_path / "camera.jpg")
    small = load_image(tmp_path / "camera.jpg", size_hint=128)
    assert min(small.size) >= 128 and small.size[0] < 1600  # decoded at a reduced scale
    assert load_image(tmp_path / "camera.jpg").size == (1600, 1200)


def test_list_images_is_recursive_sorted_and_by_suffix(tmp_path):
    for rel in ("b/2.JPG", "a.png", "b/c/3.webp", "notes.txt", ".hidden/x.png", "d.tiff"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    got = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert got == ["a.png", "b/2.JPG", "b/c/3.webp", "d.tiff"]


def test_contact_sheet_tile_shows_cutouts_as_the_model_sees_them(tmp_path):
    """The --show tile of a cut-out photo is its loaded image: transparent pixels white (not
    the green garbage they hold), a 90° EXIF tag applied."""
    from engine.contact_sheet import _tile

    a = np.zeros((4, 8, 4), np.uint8)
    a[..., :3] = (0, 255, 0)                     # garbage colour under full transparency
    a[:, :4] = (255, 0, 0, 255)                  # opaque left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a, "RGBA").save(tmp_path / "cutout.png", exif=exif)
    tile = np.asarray(_tile(str(tmp_path / "cutout.png"), 16))
    want = np.asarray(load_image(tmp_path / "cutout.png").resize((8, 16), Image.NEAREST))
    assert np.array_equal(tile[:, 4:12], want)  # 4x8 -> 8x4 upright -> x2 -> centred in 16x16
    assert tuple(tile[0, 4]) == RED and tuple(tile[15, 4]) == WHITE
