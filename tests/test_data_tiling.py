"""Image ops: Mllama tiling bit-parity with transformers' PIL backend, CATTY geometry."""
import numpy as np
import pytest
import skimage.data
from PIL import Image

from vlm_jax.data import catty_tile, get_image_op, mllama_tile
from vlm_jax.data.spec import CLIP_MEAN, CLIP_STD
from vlm_jax.data.tiling import supported_aspect_ratios


def _resized(image, height, width):
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _photographs() -> dict[str, np.ndarray]:
    """Real photographs (shipped with scikit-image) plus crops/resizes covering every canvas regime."""
    astronaut, coffee, chelsea, rocket = (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
                                          skimage.data.rocket())
    camera = np.repeat(skimage.data.camera()[..., None], 3, -1)
    return {
        "astronaut": astronaut, "coffee": coffee, "chelsea": chelsea, "rocket": rocket, "camera_grey": camera,
        "hubble_large": skimage.data.hubble_deep_field(),
        "retina_1411": skimage.data.retina(),
        "tall_crop": coffee[:, 250:330],  # 400 x 80
        "wide_crop": rocket[200:260],  # 60 x 640
        "tiny": astronaut[200:223, 200:219],  # 23 x 19
        "very_tall": _resized(chelsea, 1500, 90),
        "very_wide": _resized(astronaut, 70, 1900),
        "one_pixel_row": astronaut[100:101, :300],
    }


@pytest.fixture(scope="module")
def photographs():
    return _photographs()


@pytest.mark.parametrize("tile", [224, 448, 560])
def test_mllama_tile_matches_transformers_pil(photographs, tile):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    # The class default is ImageNet-standard 0.5/0.5; Llama 3.2 Vision checkpoints configure CLIP's.
    hf = MllamaImageProcessorPil(max_image_tiles=4, size={"height": tile, "width": tile},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    ids_seen = set()
    for name, image in photographs.items():
        ref = hf(images=[[image]], return_tensors="np", input_data_format="channels_last")
        ours = mllama_tile(image, tile, 4, CLIP_MEAN, CLIP_STD)
        assert ours.pixels.dtype == np.float32 and ours.pixels.shape[1:] == (tile, tile, 3), name
        n = ours.num_tiles
        assert n == ref["num_tiles"][0][0], name
        assert ours.aspect_ratio_id == ref["aspect_ratio_ids"][0, 0], name
        mask = np.zeros(4, np.int32)
        mask[:n] = 1
        np.testing.assert_array_equal(mask, ref["aspect_ratio_mask"][0, 0], err_msg=name)
        ref_pixels = ref["pixel_values"][0, 0]  # (4, 3, t, t)
        diff = np.abs(ours.pixels.transpose(0, 3, 1, 2) - ref_pixels[:n]).max()
        assert diff <= 1e-5, f"{name}: max abs diff {diff}"
        assert not ref_pixels[n:].any(), name  # transformers pads the tile axis with zeros
        ids_seen.add(ours.aspect_ratio_id)
    assert len(ids_seen) >= 4  # the images really exercise several canvases


def test_image_op_registry_is_channels_first_and_equal(photographs):
    image = photographs["coffee"]
    op = get_image_op("mllama_tile", image_size=224, max_tiles=4, mean=CLIP_MEAN, std=CLIP_STD)
    tiles = op(image)
    ref = mllama_tile(image, 224, 4, CLIP_MEAN, CLIP_STD)
    np.testing.assert_array_equal(tiles.pixels, ref.pixels.transpose(0, 3, 1, 2))
    resized = get_image_op("resize", image_size=64, mean=CLIP_MEAN, std=CLIP_STD)(image)
    assert resized.pixels.shape == (1, 3, 64, 64) and resized.num_tiles == 1
    with pytest.raises(ValueError, match="unknown image op"):
        get_image_op("nope")


@pytest.mark.parametrize("shape,grid", [((300, 900), (1, 3)), ((900, 300), (3, 1)), ((500, 500), (2, 2)),
                                        ((100, 100), (1, 1)), ((400, 900), (1, 2))])
def test_catty_grid_overlap_and_thumbnail(shape, grid):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    tiles = catty_tile(image, 224, 4, CLIP_MEAN, CLIP_STD)
    rows, cols = grid
    assert supported_aspect_ratios(4)[tiles.aspect_ratio_id - 1] == grid
    expected = rows * cols + (rows * cols > 1)  # plus a thumbnail when tiled
    assert tiles.num_tiles == expected and tiles.pixels.shape == (expected, 224, 224, 3)
    if rows * cols > 1:
        from vlm_jax.data.tiling import catty_tile_uint8, _resize
        raw = catty_tile_uint8(image, 224, 4).pixels
        np.testing.assert_array_equal(raw[-1], _resize(image, 224, 224))  # the global thumbnail


def test_catty_overlaps_instead_of_distorting():
    # 1:2.5 lies between grids (1,2) and (1,3): the image keeps its aspect ratio and windows overlap.
    image = np.tile(np.arange(500, dtype=np.uint8)[None, :, None] // 2, (200, 1, 3))
    from vlm_jax.data.tiling import catty_tile_uint8
    tiles = catty_tile_uint8(image, 100, 4, thumbnail=False)
    assert tiles.num_tiles == 3  # log-closest grid to 2.5 is 1x3 (|log 2.5 - log 3| < |log 2.5 - log 2|)
    # resized to 100 x 250: windows start at 0, 75, 150 -> consecutive tiles share 25 columns
    np.testing.assert_array_equal(tiles.pixels[0][:, 75:], tiles.pixels[1][:, :25])
    np.testing.assert_array_equal(tiles.pixels[1][:, 75:], tiles.pixels[2][:, :25])
