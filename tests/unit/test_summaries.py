"""TensorBoard summaries: config text, hyper-parameters, eval scalars and image grids, read back
from the event file."""

import io

import ml_collections
import numpy as np
import pytest
from helpers.event_files import summary_values
from PIL import Image
from tensorboardX import SummaryWriter

from gmflow_jax.train.summaries import (
    flatten_config,
    image_grid,
    write_config,
    write_image_grid,
    write_scalars,
)


def _config():
    c = ml_collections.ConfigDict()
    c.seed = 3
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64
    c.train.optimizer = ml_collections.ConfigDict({"lr": 2e-4, "name": "adamw"})
    c.sample = ml_collections.ConfigDict({"gm_nfes": (2, 8), "shift": None, "guided": True})
    return c


def test_flatten_config_keeps_scalars_and_stringifies_the_rest():
    assert flatten_config(_config()) == {
        "sample.gm_nfes": "(2, 8)",
        "sample.guided": True,
        "sample.shift": "None",
        "seed": 3,
        "train.batch_size": 64,
        "train.optimizer.lr": 2e-4,
        "train.optimizer.name": "adamw",
    }


def test_config_hparams_scalars_and_images_land_in_one_run(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    write_config(writer, _config(), metric_tags=["eval/fid"])
    skipped = write_scalars(writer, "eval", {"fid": 12.5, "is": float("nan")}, step=7)
    images = np.linspace(-1, 1, 5 * 4 * 3 * 1).reshape(5, 4, 3, 1)
    grid = write_image_grid(writer, "eval/samples", images, step=7, ncols=3)
    writer.close()
    assert skipped == ["is"]

    values = summary_values(tmp_path)
    by_tag = {v.tag: (step, v) for step, v in values}
    assert by_tag["eval/fid"][0] == 7 and by_tag["eval/fid"][1].simple_value == 12.5
    assert "eval/is" not in by_tag
    text = by_tag["config/text_summary"][1].tensor.string_val[0].decode()
    assert '"lr": 0.0002' in text and '"batch_size": 64' in text
    plugins = {v.metadata.plugin_data.plugin_name for _, v in values}
    assert "hparams" in plugins
    hp = [v for _, v in values if v.metadata.plugin_data.plugin_name == "hparams"]
    assert any(b"train.optimizer.lr" in v.metadata.plugin_data.content for v in hp)
    png = by_tag["eval/samples"][1].image.encoded_image_string
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), grid)


def test_image_grid_places_each_image_by_brute_force():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 3, 2, 3), dtype=np.uint8)
    grid = image_grid(imgs, ncols=3, pad=2)
    assert grid.shape == (3 * 5 + 2, 3 * 4 + 2, 3)
    for i in range(7):
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(grid[2 + 5 * r : 5 * r + 5, 2 + 4 * c : 4 * c + 4], imgs[i])
    mask = np.ones(grid.shape[:2], bool)
    for i in range(7):
        r, c = divmod(i, 3)
        mask[2 + 5 * r : 5 * r + 5, 2 + 4 * c : 4 * c + 4] = False
    assert not grid[mask].any()  # padding and the two empty cells are black


def test_float_images_map_minus_one_to_one_onto_0_255():
    grid = image_grid(np.array([-1.0, -0.5, 0.0, 1.0, 2.0]).reshape(1, 1, 5, 1), pad=0)
    np.testing.assert_array_equal(grid[0, :, 0], [0, 64, 128, 255, 255])


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="shape"):
        image_grid(np.zeros((2, 4, 4, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        image_grid(np.full((1, 2, 2, 1), np.nan))
