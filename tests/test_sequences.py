"""B10 (experiments.sequences): gradient vs distance in recurrent nets, on short runs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neuralode
from experiments import sequences
from experiments.common import run_experiment

SMALL = ["--length", "300", "--long-length", "3000", "--burn-in", "100"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequences")
    results = run_experiment(sequences.__name__, sequences.Config, sequences.run, sequences.QUICK,
                             SMALL + ["--out", str(out)])
    assert json.loads((out / "sequences.json").read_text())["gradient_vs_distance"]
    assert (out / "sequences_gradients.png").exists()
    return results


@pytest.fixture(scope="module")
def small():
    cfg = sequences.Config(hidden=6, inputs=3)
    rng = np.random.default_rng(0)
    params = sequences.make_params(cfg, rng)
    u = rng.standard_normal(6)
    return cfg, params, jnp.asarray(rng.standard_normal((40, 3))), jnp.asarray(u / np.linalg.norm(u))


def test_perturbation_gradients_equal_gradients_of_the_remaining_run(small):
    """dL/d delta_t, all t in one backward pass, is dL/dh_t: the gradient of the run restarted at
    h_t, for the plain scan and for the odeint (Euler) cell."""
    cfg, params, xs, u = small
    (w, v), (a, b) = (2.0 * params["rnn_w"], params["rnn_v"]), params["antisymmetric"]
    cells = {"tanh": (lambda h0, xs, d: sequences.tanh_rnn_states((w, v), h0, xs, d),
                      lambda h, x: jnp.tanh(w @ h + v @ x)),
             "antisymmetric": (lambda h0, xs, d: sequences.antisymmetric_states((a, b), h0, xs, d, cfg.eps),
                               lambda h, x: h + cfg.eps * jnp.tanh(a @ h + b @ x))}
    h0, t = 0.1 * jnp.ones(6, jnp.float64), 23
    for name, (final, step) in cells.items():
        grads = jax.jit(lambda h0: sequences.state_gradients(final, h0, xs, u))(h0)
        h_t = h0
        for x in xs[:t]:
            h_t = step(h_t, x)
        restarted = jax.jit(jax.grad(lambda h: jnp.vdot(u, final(h, xs[t:], jnp.zeros((40 - t, 6))))))
        np.testing.assert_allclose(grads[t], restarted(h_t), rtol=1e-11, err_msg=name)
        np.testing.assert_allclose(grads[40], u, rtol=1e-15)


def test_antisymmetric_cell_through_odeint_is_the_residual_recursion(small):
    cfg, params, xs, _ = small
    a, v = params["antisymmetric"]
    assert np.max(np.abs(a + a.T + 2 * cfg.gamma * jnp.eye(6))) < 1e-15  # A = W - W^T - gamma I
    h = jnp.linspace(-0.5, 0.5, 6)
    got = sequences.antisymmetric_states(params["antisymmetric"], h, xs, jnp.zeros((40, 6)), cfg.eps)
    for x in xs:
        h = h + cfg.eps * jnp.tanh(a @ h + v @ x)
    np.testing.assert_allclose(got, h, rtol=1e-13)
    with pytest.raises(ValueError, match="max_steps"):  # odeint is really the integrator
        neuralode.odeint(sequences.antisymmetric_field(params["antisymmetric"], cfg.eps), h,
                         cfg.eps * jnp.arange(41.0), (xs, jnp.zeros((40, 6))), solver=neuralode.Euler(),
                         max_steps=39)


def test_row_norms_do_not_underflow():
    g = jnp.full((2, 4), 3e-200).at[1].set(0.0)
    np.testing.assert_allclose(sequences.row_norms(g), [6e-200, 0.0], rtol=1e-14)
    assert float(jnp.linalg.norm(g[0])) == 0.0  # what the scaling avoids


def test_tanh_rnn_vanishes_below_and_stays_under_the_singular_value_bound(results):
    rnn = results["tanh_rnn"]
    for sigma, row in rnn.items():
        # ||dL/dh_t|| <= sigma_max(W)^(T - t) at every t (|tanh'| <= 1).
        assert row["max_log10_over_singular_value_bound"] < 1e-12, sigma
    assert rnn[0.5]["start_ratio"] < 1e-100 and rnn[1.0]["start_ratio"] < 1e-3
    gains = [rnn[s]["log10_gain_per_step"] for s in sorted(rnn)]
    assert all(a < b for a, b in zip(gains, gains[1:])) and gains[0] < -0.3 and gains[-1] > 0


def test_lstm_direct_path_and_shut_output_gate(results):
    lstm = results["lstm"]
    for bias, row in lstm.items():
        # The closed form dL/dc_T prod f_s is the gradient with the h-feedback into the gates cut.
        assert row["direct_path_vs_cut_autodiff_max_rel"] < 1e-12, bias
    # The direct path's gain is close to sigmoid(b_f)^T when the gates sit at their bias.
    assert lstm[7.0]["direct_path_start_ratio"] > 0.3
    assert lstm[0.0]["direct_path_start_ratio"] < 1e-60
    shut = results["lstm_output_gate_shut"]
    assert shut["max_cell_gradient"] == 0.0 and shut["max_hidden_gradient_before_T"] == 0.0
    assert np.all(np.asarray(results["gradient_vs_distance"]["lstm_output_gate_shut"]) == 0.0)


def test_antisymmetric_rnn_keeps_the_gradient_and_claims_hold(results):
    assert 0.5 < results["antisymmetric"]["start_ratio"] < 2
    long_runs = results["long_runs"]
    assert set(long_runs) == {"antisymmetric", "lstm_bf7"}
    assert all(np.isfinite(r["start_ratio"]) and r["distance"][-1] == 3000 for r in long_runs.values())
    assert all(results["checks"].values()), results["checks"]
    for claim in results["claims"]:
        assert set(claim) == {"id", "claim", "source_figure", "measured", "verdict"}
        assert not claim["verdict"].startswith("refuted"), claim
    assert len(results["gradient_vs_distance"]["tanh_rnn_sigma1"]) == 301
