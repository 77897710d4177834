"""experiments.table: the memory-vs-depth column of Chen et al. 2018, Table 1, the rows' settings,
the tolerance sweep and its equal-accuracy comparisons."""
import dataclasses

import pytest

from experiments._table_report import sweep_markdown
from experiments.table import Config, equal_accuracy_nfe, memory_vs_depth, nfe_to_reach
from neuralode.data import load_dataset


def test_gradient_memory_grows_with_resnet_depth_not_with_odenet_steps():
    """Backprop through L blocks stores O(L) activations; the continuous adjoint's gradient memory
    does not depend on how many steps the solver takes."""
    cfg = Config(channels=(4, 8), measure_batch=8, depths=(1, 4), memory_rtols=(1e-1, 1e-6))
    memory = memory_vs_depth(cfg, "digits", load_dataset("digits"), ("resnet", "odenet"))
    resnet, odenet = memory["rows"]["resnet"], memory["rows"]["odenet"]
    assert [r["nfe_forward"] for r in resnet] == [2, 8]  # two stages of 1 and 4 Euler steps
    assert memory["memory_growth"]["resnet"] > 2
    assert odenet[1]["nfe_forward"] > odenet[0]["nfe_forward"]
    assert odenet[1]["grad_memory_bytes"] == odenet[0]["grad_memory_bytes"]


def test_memory_sweep_rejects_unknown_models_and_single_points():
    digits = load_dataset("digits")
    with pytest.raises(ValueError, match="models: expected some of"):
        memory_vs_depth(Config(), "digits", digits, ("densenet",))
    with pytest.raises(ValueError, match="depths and memory_rtols need two values"):
        memory_vs_depth(Config(depths=(4,)), "digits", digits)


def test_rnode_is_compared_with_an_unregularised_odenet_at_its_own_tolerance():
    from experiments.table import headline, row_spec, row_train_config

    cfg = Config(rtol=1e-3, atol=1e-4, rnode_rtol=1e-5, rnode_kinetic_weight=3e-4,
                 rnode_jacobian_weight=2e-4, epochs_mnist1d=20, rnode_epochs_mnist1d=40,
                 augment_channels=6, checkpoint_every=7)
    odenet, tight, rnode, anode = (row_spec(cfg, "digits", m)
                                   for m in ("odenet", "odenet_tight", "rnode", "anode"))
    assert (odenet.rtol, odenet.atol) == (1e-3, 1e-4)
    assert (tight.rtol, tight.atol, tight.kinetic_weight, tight.jacobian_weight) == (1e-5, 1e-5, 0, 0)
    assert (rnode.rtol, rnode.atol, rnode.kinetic_weight, rnode.jacobian_weight) == (1e-5, 1e-5, 3e-4, 2e-4)
    assert tight.model == rnode.model == anode.model == "odenet"
    assert (odenet.augment_channels, anode.augment_channels, rnode.augment_channels) == (0, 6, 0)
    assert anode == dataclasses.replace(odenet, augment_channels=6)  # ANODE differs in nothing else
    assert row_spec(cfg, "digits", "rknet").stem_kernel_size == 3
    assert row_spec(cfg, "mnist1d", "rknet").stem_kernel_size == 5
    epochs = [row_train_config(cfg, "mnist1d", m).epochs for m in ("odenet", "odenet_tight", "rnode")]
    assert epochs == [20, 40, 40]
    assert row_train_config(cfg, "digits", "resnet").checkpoint_every == 7
    rows = {"odenet": {"test_acc": 0.99, "nfe_forward": 56.0},
            "odenet_tight": {"test_acc": 0.99, "nfe_forward": 104.0},
            "rnode": {"test_acc": 0.985, "nfe_forward": 52.0}}
    out = headline({"digits": rows})
    assert out["digits_nfe_odenet_over_rnode"] == 2.0
    assert out["digits_rnode_minus_odenet_acc_points"] == -0.5


def test_tolerance_sweep_reevaluates_trained_nets_at_each_rtol():
    """The sweep evaluates models rebuilt at each tolerance: NFE grow as rtol tightens, the models
    keep their rtol, accuracy is that of the whole test split, and the ratio is odenet_tight /
    rnode."""
    from neuralode.measure import accuracy
    from neuralode.models import ModelSpec, build_model

    from experiments.table import tolerance_sweep

    digits = load_dataset("digits")
    small = digits._replace(x_test=digits.x_test[:64], y_test=digits.y_test[:64])
    specs = {"odenet_tight": ModelSpec(model="odenet", channels=(4, 8), rtol=1e-3, atol=1e-3),
             "rnode": ModelSpec(model="odenet", channels=(4, 8), rtol=1e-3, atol=1e-3, seed=1)}
    trained = {name: (spec, build_model(spec, small)) for name, spec in specs.items()}
    cfg = Config(sweep_rtols=(1e-2, 1e-6), fixed_solvers=("Euler", "RK4"), fixed_steps=(1, 3),
                 channels=(4, 8), batch_size=16)
    sweep = tolerance_sweep(cfg, small, trained)
    for name, (spec, model) in trained.items():
        assert (model.rtol, model.atol) == (1e-3, 1e-3)
        loose, tight = sweep["rows"][name]
        assert tight["nfe_forward"] > loose["nfe_forward"] >= 2 * 7  # two stages, >= 1 step each
        # The same seed builds the same parameters: a model built at rtol 1e-6 must score the same.
        reference = build_model(dataclasses.replace(spec, rtol=1e-6, atol=1e-6), small)
        assert tight["test_acc"] == accuracy(reference, small.x_test, small.y_test, batch_size=24)
    assert sweep["nfe_odenet_over_rnode"] == [
        a["nfe_forward"] / b["nfe_forward"] for a, b in zip(sweep["rows"]["odenet_tight"], sweep["rows"]["rnode"])]
    assert sweep["equal_accuracy"] == equal_accuracy_nfe(sweep["rows"]["odenet_tight"], sweep["rows"]["rnode"])
    # Fixed steps: the trained field in an RK-Net; one built from the ODE-Net's seed holds the
    # same parameters, so it must score the same.
    for name, (spec, _) in trained.items():
        points = sweep["fixed_steps"][name]
        assert [(p["solver"], p["steps"]) for p in points] == [("Euler", 1), ("Euler", 3), ("RK4", 1), ("RK4", 3)]
        assert [p["nfe_forward"] for p in points] == [2, 6, 8, 24]  # two stages x steps x stages of the method
        twin = build_model(dataclasses.replace(spec, model="rknet", steps=3), small)
        assert points[3]["test_acc"] == accuracy(twin, small.x_test, small.y_test)
    assert sweep["equal_accuracy_any_solver"] == equal_accuracy_nfe(
        sweep["rows"]["odenet_tight"] + sweep["fixed_steps"]["odenet_tight"],
        sweep["rows"]["rnode"] + sweep["fixed_steps"]["rnode"])
    assert sweep["nfe_to_reach"] == nfe_to_reach(
        sweep["rows"]["odenet_tight"] + sweep["fixed_steps"]["odenet_tight"],
        sweep["rows"]["rnode"] + sweep["fixed_steps"]["rnode"])
    spec, model = trained["rnode"]
    with pytest.raises(ValueError, match="model: its parameters do not fit"):
        tolerance_sweep(cfg, small, {"rnode": (dataclasses.replace(spec, channels=(4, 4)), model)})


def test_equal_accuracy_takes_each_nets_cheapest_point_at_the_best_accuracy_both_reach():
    reference = [{"rtol": 1e-3, "test_acc": 0.95, "nfe_forward": 50},
                 {"rtol": 1e-4, "test_acc": 0.985, "nfe_forward": 80},
                 {"rtol": 1e-5, "test_acc": 0.984, "nfe_forward": 104}]
    regularised = [{"rtol": 1e-3, "test_acc": 0.96, "nfe_forward": 40},
                   {"rtol": 1e-4, "test_acc": 0.99, "nfe_forward": 70},
                   {"rtol": 1e-5, "test_acc": 0.986, "nfe_forward": 64}]
    equal = equal_accuracy_nfe(reference, regularised)  # best both reach: the reference's 98.5 %
    assert equal == {"test_acc": 0.985, "odenet_tight": reference[1], "rnode": regularised[2],
                     "ratio": 80 / 64}
    worse = [{**p, "test_acc": p["test_acc"] - 0.02} for p in regularised]  # best both reach: 97.0 %
    assert equal_accuracy_nfe(reference, worse)["ratio"] == 80 / 70


def test_nfe_to_reach_compares_the_cheapest_evaluations_at_every_accuracy_on_either_front():
    reference = [{"solver": "Euler", "steps": 1, "test_acc": 0.85, "nfe_forward": 2},
                 {"solver": "Euler", "steps": 2, "test_acc": 0.948, "nfe_forward": 4},  # dominated
                 {"solver": "Midpoint", "steps": 1, "test_acc": 0.971, "nfe_forward": 4},
                 {"rtol": 1e-5, "test_acc": 0.985, "nfe_forward": 104}]
    regularised = [{"solver": "Euler", "steps": 1, "test_acc": 0.952, "nfe_forward": 2},
                   {"solver": "Midpoint", "steps": 1, "test_acc": 0.976, "nfe_forward": 4},
                   {"rtol": 1e-5, "test_acc": 0.976, "nfe_forward": 62}]  # dominated
    rows = nfe_to_reach(reference, regularised)
    assert [r["test_acc"] for r in rows] == [0.85, 0.952, 0.971, 0.976, 0.985]
    assert [r["ratio"] for r in rows] == [1.0, 2.0, 1.0, 104 / 4, None]
    assert rows[1]["odenet_tight"] is reference[2] and rows[1]["rnode"] is regularised[0]
    assert rows[4]["rnode"] is None and rows[4]["odenet_tight"] is reference[3]


def test_sweep_markdown_gives_the_ratio_per_tolerance_and_at_equal_accuracy():
    rows = {"odenet_tight": [{"rtol": 1e-3, "test_acc": 0.95, "nfe_forward": 56},
                             {"rtol": 1e-5, "test_acc": 0.984, "nfe_forward": 104}],
            "rnode": [{"rtol": 1e-3, "test_acc": 0.96, "nfe_forward": 44},
                      {"rtol": 1e-5, "test_acc": 0.99, "nfe_forward": 68}]}
    sweep = {"rtols": [1e-3, 1e-5], "rows": rows, "nfe_odenet_over_rnode": [56 / 44, 104 / 68],
             "equal_accuracy": equal_accuracy_nfe(rows["odenet_tight"], rows["rnode"])}
    lines = sweep_markdown("MNIST-1D", sweep).splitlines()
    assert lines[4] == "| 0.001 | 95.0 % | 56 | 96.0 % | 44 | 1.27x |"
    assert lines[5] == "| 1e-05 | 98.4 % | 104 | 99.0 % | 68 | 1.53x |"
    assert lines[7] == ("Among the tolerances, at the best accuracy both reach (98.4 %): ODE-Net 104 NFE "
                        "(rtol 1e-05), RNODE 68 NFE (rtol 1e-05): 1.53x fewer at equal accuracy.")
    fixed = {"odenet_tight": [{"solver": "RK4", "steps": 1, "test_acc": 0.90, "nfe_forward": 8},
                              {"solver": "RK4", "steps": 4, "test_acc": 0.984, "nfe_forward": 32}],
             "rnode": [{"solver": "RK4", "steps": 1, "test_acc": 0.984, "nfe_forward": 8},
                       {"solver": "RK4", "steps": 4, "test_acc": 0.99, "nfe_forward": 32}]}
    sweep.update(fixed_steps=fixed, equal_accuracy_any_solver=equal_accuracy_nfe(
        rows["odenet_tight"] + fixed["odenet_tight"], rows["rnode"] + fixed["rnode"]))
    lines = sweep_markdown("MNIST-1D", sweep).splitlines()
    assert lines[9:14] == ["| solver | ODE-Net acc | ODE-Net NFE | RNODE acc | RNODE NFE |",
                           "|---|---:|---:|---:|---:|",
                           "| RK4, 1 step | 90.0 % | 8 | 98.4 % | 8 |",
                           "| RK4, 4 steps | 98.4 % | 32 | 99.0 % | 32 |", ""]
    assert lines[16] == ("Among all evaluations, at the best accuracy both reach (98.4 %): ODE-Net 32 NFE "
                         "(RK4, 4 steps), RNODE 8 NFE (RK4, 1 step): 4.00x fewer at equal accuracy.")
    sweep["nfe_to_reach"] = nfe_to_reach(rows["odenet_tight"] + fixed["odenet_tight"],
                                         rows["rnode"] + fixed["rnode"])
    lines = sweep_markdown("MNIST-1D", sweep).splitlines()
    assert lines[21:] == ["|---:|---:|---:|---:|",
                          "| >= 90.0 % | 8 (RK4, 1 step) | 8 (RK4, 1 step) | 1.00x |",
                          "| >= 98.4 % | 32 (RK4, 4 steps) | 8 (RK4, 1 step) | 4.00x |",
                          "| >= 99.0 % | never | 32 (RK4, 4 steps) | - |"]


def test_bad_sweep_settings_fail_before_any_training():
    from experiments.table import run

    with pytest.raises(ValueError, match="fixed_solvers: unknown \\['Dopri5'\\]"):
        run(Config(fixed_solvers=("Dopri5",)))
    with pytest.raises(ValueError, match="fixed_steps: expected positive ints"):
        run(Config(fixed_steps=(0, 2)))
    with pytest.raises(ValueError, match="sweep_rtols: expected positive"):
        run(Config(sweep_rtols=(1e-3, -1.0)))
