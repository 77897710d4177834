"""C5: posterior collapse of a VAE whose autoregressive decoder has a direct path from the input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import vae
from experiments.common import run_experiment

# Width 64 = the number of pixels: every masked kernel is 64 x 64, one shape to initialise and compile.
SMALL = ["--hidden", "64", "--epochs", "10", "--batch-size", "32", "--learning-rate", "2e-3", "--samples", "2",
         "--decoders", "mlp", "ar", "skip"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    r = run_experiment(vae.__name__, vae.Config, vae.run, vae.QUICK, SMALL + ["--out", str(out)])
    assert (out / "vae_collapse.png").stat().st_size > 10_000
    return r


@pytest.mark.parametrize("z_everywhere", [False, True])
def test_made_decoder_is_autoregressive(z_everywhere):
    decoder = vae.MADEDecoder(8, 64, 3, z_everywhere, nnx.Rngs(0), seed=0)
    x = jax.random.bernoulli(jax.random.key(1), 0.3, (vae.PIXELS,)).astype(jnp.float32)
    z = jax.random.normal(jax.random.key(2), (8,), jnp.float32)
    by_x, by_z = map(np.asarray, jax.jit(jax.jacfwd(lambda x, z: decoder(z[None], x[None])[0], argnums=(0, 1)))(x, z))
    assert np.all(by_x[np.triu_indices(vae.PIXELS)] == 0)  # logit i sees x_j only for j < i
    assert np.count_nonzero(np.tril(by_x, -1)) > vae.PIXELS  # and does see earlier pixels
    assert np.count_nonzero(by_z[1:]) > 0
    # Without skips no hidden unit reaches the first logit, so z cannot; with skips it does.
    assert np.any(by_z[0] != 0) == z_everywhere


def test_mutual_information_estimator_limits():
    class Constant(nnx.Module):  # q(z|x) the same for every x: I(x; z) = 0
        def __call__(self, x):
            return jnp.zeros((len(x), 2)), jnp.zeros((len(x), 2))

    class Separated(nnx.Module):  # far apart, narrow posteriors: z identifies x, I = log N
        def __call__(self, x):
            return 100.0 * x[:, :2], jnp.full((len(x), 2), -10.0)

    model = vae.VAE("mlp", vae.Config(hidden=64), nnx.Rngs(0))
    x = np.stack([np.arange(16.0), -np.arange(16.0)], axis=1).astype(np.float32)
    model.encoder = Constant()
    assert vae.mutual_information(model, x, jax.random.key(0)) == pytest.approx(0.0, abs=1e-6)
    model.encoder = Separated()
    assert vae.mutual_information(model, x, jax.random.key(0)) == pytest.approx(math.log(16), abs=1e-5)


def test_kl_annealing_weight():
    model = vae.VAE("mlp", vae.Config(hidden=64), nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (4, vae.PIXELS)), jnp.float32)
    key = jax.random.key(0)
    log_likelihood, kl, _, _ = model.terms(x, key)
    for step, beta in ((0, 0.0), (50, 0.5), (100, 1.0), (300, 1.0)):
        loss, _ = vae.negative_elbo(100.0)(model, x, None, key, step)
        assert float(loss) == pytest.approx(float(jnp.mean(-log_likelihood + beta * kl)), rel=1e-6)


def test_direct_path_collapses_and_skip_restores(results):
    m = results["models"]
    assert m["ar"]["kl"] < 0.5 and m["ar"]["active_units"] <= 1 and m["ar"]["mutual_information"] < 0.5
    assert m["skip"]["kl"] > 2 and m["skip"]["active_units"] >= 4 and m["skip"]["mutual_information"] > 1
    assert m["mlp"]["kl"] > 2 and m["mlp"]["active_units"] >= 4
    for r in m.values():
        assert r["elbo"] == pytest.approx(r["reconstruction"] - r["kl"])
        assert -1e-3 < r["mutual_information"] <= math.log(1437) + 1e-6
        assert r["active_units"] == int(np.sum(np.asarray(r["unit_activity"]) > 0.01))


def test_claim_and_flags(results):
    (claim,) = results["claims"]
    assert claim["id"] == "C5"
    with pytest.raises(ValueError, match="decoders"):
        vae.run(vae.Config(decoders=("mlp", "ar")))
