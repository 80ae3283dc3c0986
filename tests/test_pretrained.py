"""The pretrained models shipped under saved_models/pretrained: they load offline, are small,
and score the test bound their JSON records (docs/results/README.md says how they were trained).
"""

import json

import numpy as np
import pytest

import keras_aevb
from keras_aevb import data as data_lib
from keras_aevb import pretrained_models

SHIPPED = sorted(pretrained_models.SHIPPED_RUNS.values())


def test_every_promised_model_ships_with_its_record():
    assert keras_aevb.pretrained() == SHIPPED
    for name in SHIPPED:
        info = pretrained_models.pretrained_info(name)
        assert info["name"] == name and info["method"] == "aevb"
        assert info["examples_seen"] >= 10**7  # the budget for every panel
        path = pretrained_models.pretrained_dir() / f"{name}.keras"
        assert path.stat().st_size < 4_000_000  # weights only, float32, no optimizer state


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="no pretrained model 'mnist_nz7'; the shipped ones are"):
        keras_aevb.pretrained("mnist_nz7")


@pytest.mark.parametrize("name", SHIPPED)
def test_a_pretrained_model_scores_its_recorded_test_bound(name):
    info = pretrained_models.pretrained_info(name)
    if data_lib.default_data_dir(info["dataset"]) is None:
        pytest.skip(f"needs ../shared/data/{info['dataset']}")
    model = keras_aevb.pretrained(name)
    assert getattr(model, "optimizer", None) is None
    assert model.latent_dim == info["latent_dim"]
    recorded = info["test_bound"]["value"]
    # The same draws (the recorded seed): the recorded value, to float32 summation order.
    same = pretrained_models.pretrained_test_bound(model, info)
    np.testing.assert_allclose(same, recorded, rtol=1e-5)
    # Fresh draws of z (another seed) on the same test draw: within 0.5 nats. The Monte Carlo
    # error is small against that: 100 draws on MNIST's 10,000 test examples, 2000 on Frey
    # Face's 200 (where 100-draw means spread over 0.45 nats in four seeds).
    fresh = pretrained_models.pretrained_test_bound(model, info, seed=99)
    assert abs(fresh - recorded) < 0.5, (name, fresh, recorded)
    # The run's last history row (one draw of z per test example): the same weights, so
    # within that estimate's Monte Carlo error (1-draw means on Frey Face spread over 4 nats).
    assert abs(fresh - info["history_test_elbo"]) < 5.0, (name, fresh, info["history_test_elbo"])
    assert json.loads(json.dumps(info)) == info
    assert np.isfinite(recorded)
