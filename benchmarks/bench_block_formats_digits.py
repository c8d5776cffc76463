"""Block-scaled formats on the digits MLP: accuracy of MXFP8 W+A, MXFP4 and NVFP4 weight-only
against int8 / int4 at (about) equal bits, PTQ and QAT, on the serving path.

Pairs at equal bits per weight (element bits + the block scale's share):

* 8 bits: MXFP8 E4M3 weights and activations (8 + 8/32 = 8.25) vs int8 per-channel weights
  with dynamic per-token int8 activations;
* 4 bits, weight-only: MXFP4 (4 + 8/32 = 4.25) and NVFP4 (4 + 8/16 = 4.5) vs int4 per group
  of 32 (4 + 32/32 float32 scale = 5) and int4 per channel.

Every row is evaluated as ``examples/digits_experiment.py`` does: converted variables, infer
mode (equal to train mode bit for bit, checked). Usage::

    python benchmarks/bench_block_formats_digits.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import digits_experiment as digits  # noqa: E402

from qatjax import QatConfig  # noqa: E402

DYNAMIC = dict(activation_scaling="dynamic")
RECIPES = {
    "int8 W8A8 (per-token act.)": QatConfig(weight_format="int8", activation_format="int8",
                                            activation_granularity="per_token", **DYNAMIC),
    "mxfp8 W+A": QatConfig(weight_format="mxfp8_e4m3", activation_format="mxfp8_e4m3"),
    "int4 W per-channel": QatConfig(weight_format="int4", activation_format=None),
    "int4 W per-group 32": QatConfig(weight_format="int4", activation_format=None,
                                     weight_granularity="per_group", weight_group_size=32),
    "mxfp4 W": QatConfig(weight_format="mxfp4", activation_format=None),
    "mxfp4 W (ceil)": QatConfig(weight_format="mxfp4_ceil", activation_format=None),
    "nvfp4 W": QatConfig(weight_format="nvfp4", activation_format=None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick training budget")
    args = parser.parse_args()
    settings = digits.QUICK if args.quick else digits.FULL
    data = digits.load_data()
    model, variables = digits.train_float(data, settings)
    float_logits = digits.logits(model, variables, data.x_test, "float")
    rows = [digits.float_row(model, variables, data)]
    for kind in ("ptq", "qat"):
        for name, config in RECIPES.items():
            row = digits.run_recipe(config, kind, variables, data, name=f"{name} {kind}",
                                    settings=settings, float_logits=float_logits)
            assert row.infer_vs_train == 0.0, (name, row.infer_vs_train)
            rows.append(row)
    print(digits.format_table(rows))


if __name__ == "__main__":
    main()
