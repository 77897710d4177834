"""B11 (experiments.attention): gradient vs distance, path length in the jaxpr, cost vs length."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import attention
from experiments.common import run_experiment

SMALL = ["--lengths", "16", "64", "256", "--cost-lengths", "256", "512", "1024", "--repeats", "1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention")
    results = run_experiment(attention.__name__, attention.Config, attention.run, attention.QUICK,
                             SMALL + ["--out", str(out)])
    assert json.loads((out / "attention.json").read_text())["gradient_vs_distance"]
    assert {p.name for p in out.glob("*.png")} == {"attention_gradients.png", "attention_cost.png"}
    return results


def test_last_query_is_the_last_row_of_the_layer():
    params = attention.init_attention(jax.random.key(0), 8)
    x = jax.random.normal(jax.random.key(1), (20, 8), jnp.float64)
    np.testing.assert_allclose(attention.attention_last(params, x), attention.attention_layer(params, x)[-1],
                               rtol=1e-13)


def test_path_length_counts_layer_calls_in_the_jaxpr():
    layer = jax.jit(lambda x: jnp.sin(x))  # a jitted function named "<lambda>"
    lengths = attention.graph_path_lengths(lambda a, b, c: layer(layer(a) + b) * c, [jnp.ones(3)] * 3,
                                           {"<lambda>"})
    assert lengths == [2, 1, 0]
    paths = attention.path_lengths(12, 4)
    assert paths["attention"] == {"from_first_input": 1, "max": 1, "min": 1}
    assert paths["rnn"] == {"from_first_input": 12, "max": 12, "min": 1}


def test_rnn_flops_correct_xla_counting_the_loop_body_once():
    params = attention.init_rnn(jax.random.key(0), 16, 1.0, jnp.float32)
    x = jnp.ones((10, 16), jnp.float32)
    corrected, unrolled = attention.rnn_flops(params, x), attention.rnn_flops(params, x, unroll=True)
    assert corrected == pytest.approx(unrolled, rel=1e-3)  # the scan's loop counter adds a few
    scan_only = attention.compiled_flops(jax.jit(attention.rnn_layer).lower(params, x).compile())
    assert scan_only < 0.2 * unrolled  # what XLA reports for the loop without the correction


def test_gradient_vs_distance(results):
    fits = results["gradient_fits"]
    for n in (16, 64, 256):
        assert abs(fits["attention"][n]["loglog_slope"]) <= 0.1
        assert 0.9 < fits["attention"][n]["n_times_mean_norm"] < 1.8  # spread evenly: ~1/n each
        assert fits["rnn"][n]["semilog_r2"] > 0.95
        assert -0.3 < fits["rnn"][n]["log10_gain_per_step"] < -0.1
        assert fits["attention"][n]["draws"] == max(8, 8 * 256 // n)
    assert fits["rnn"][256]["far_over_near"] < 1e-30
    assert [len(results["gradient_vs_distance"][f"attention_n{n}"]) for n in (16, 64, 256)] == [16, 64, 256]


def test_cost_and_claim(results):
    cost = results["cost"]
    assert cost["attention"]["flops_loglog_slope"] >= 1.8
    assert cost["rnn"]["flops_loglog_slope"] == pytest.approx(1.0, abs=0.02)
    d = 32
    for n, flops in zip(cost["attention"]["n"], cost["attention"]["flops"]):
        assert 4 * n * n * d + 6 * n * d * d <= flops <= 1.3 * (4 * n * n * d + 6 * n * d * d)
    assert cost["attention"]["gradient_memory_bytes_loglog_slope"] > 1.8
    assert cost["rnn"]["gradient_memory_bytes_loglog_slope"] == pytest.approx(1.0, abs=0.1)
    assert results["path_lengths"][256] == {"attention": {"from_first_input": 1, "max": 1, "min": 1},
                                            "rnn": {"from_first_input": 256, "max": 256, "min": 1}}
    assert all(results["checks"].values()), results["checks"]
    (claim,) = results["claims"]
    assert set(claim) == {"id", "claim", "source_figure", "measured", "verdict"}
    assert claim["verdict"].startswith("confirmed")
