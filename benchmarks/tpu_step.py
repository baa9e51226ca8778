"""vitpod's TPU train step against big_vision's, under XLA's TPU cost model.

    python benchmarks/tpu_step.py [--rows=S/16,v5e:2x2,64 ...] [--out=FILE.json]

Both steps are compiled ahead of time on this CPU for a TPU topology (libtpu describes the
chips; none is attached) with vitpod.planning.cost.COMPILER_OPTIONS, and read per chip:
the cost model's predicted step time (`optimal_seconds`), bytes accessed, FLOPs and HBM
temporaries. Same settings on both sides: 224 px, 1000 classes, bf16 matmuls, class token,
learned position embeddings, tanh GELU, AdamW (b2 0.999, f32 moments, decay on kernels)
with clip 1.0 and a warmup + cosine schedule, no dropout, mixup or EMA, the blocks
unrolled (the cost model counts a loop body once), params and optimizer state replicated,
the batch split over a `data` axis of every chip, the state donated.

The reference is big_vision at commit 0127fb6b (benchmarks/bigvision_vit.py: its vit.py
`Model(variant=..., posemb="learn", pool_type="tok", dtype_mm="bfloat16", scan=False)`;
below, its train.py `update_fn`: softmax cross-entropy on one-hot labels, value_and_grad,
the l2 norms it logs; its optax.py chain). Images reach it as float32 in [-1, 1], as its
input pipeline gives them; vitpod's step takes uint8 and normalises on the chip.

Prints one JSON line: {"rows": [...], "versions": {...}, "compiler_options": {...}}.
"""

import json
import os
import sys
import time

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
SECTION = "## TPU train step under XLA's cost model: vitpod vs big_vision"
ROWS = [item for v in ("S/16", "B/16") for t in ("v5e:2x2", "v4:2x2x1") for b in (64, 128, 256)
        for item in (v, t, str(b))]  # flat, as --rows is
flags.DEFINE_list("rows", ROWS, "VARIANT,TOPOLOGY,GLOBAL_BATCH rows, each a comma triple "
                  "(the list is flat: every three items make a row).")
flags.DEFINE_string("out", "", "Also write the JSON here, updated after every row.")
flags.DEFINE_string("markdown", "", "Also write the table as this file's section "
                    f"{SECTION!r} (benchmarks/results.md), the other sections kept.")
flags.DEFINE_list("sides", ["vitpod", "reference"], "Which steps to compile; a side left out "
                  "keeps its figures from --out (the reference does not change with vitpod).")
FLAGS = flags.FLAGS
NUM_CLASSES, IMAGE_SIZE, TOTAL_STEPS = 1000, 224, 100_000
TARGETS = {"seconds": 0.90, "temp_bytes": 1.0}


def reference_lowered(variant: str, batch: int, devices):
    """big_vision's update_fn on `devices`, lowered."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, HERE)
    from bigvision_vit import Model

    mesh = jax.sharding.Mesh(devices, ("data",))
    model = Model(num_classes=NUM_CLASSES, variant=variant, posemb="learn", pool_type="tok",
                  dtype_mm="bfloat16")
    kernels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731  wd_mults' default
        lambda path, _: path[-1].key == "kernel", params)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10_000, TOTAL_STEPS)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.scale_by_adam(b2=0.999, mu_dtype=jnp.float32), optax.scale(1e-3),
                     optax.add_decayed_weights(1e-4, kernels), optax.scale_by_schedule(schedule),
                     optax.scale(-1.0))
    images = jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)

    def init():
        params = model.init(jax.random.key(0), jnp.zeros((1, *images.shape[1:])))["params"]
        return {"params": params, "opt": tx.init(params)}

    def update_fn(train_state, batch):
        def loss_fn(params):
            logits, _ = model.apply({"params": params}, batch["image"], train=True)
            log_p = jax.nn.log_softmax(logits, axis=-1)  # big_vision utils.softmax_xent
            return jnp.mean(-jnp.sum(batch["labels"] * log_p, axis=-1))

        params, opt = train_state["params"], train_state["opt"]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        measurements = {"training_loss": loss}
        for name, tree in (("l2_grads", grads), ("l2_params", params), ("l2_updates", updates)):
            measurements[name] = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))
        return {"params": params, "opt": opt}, measurements

    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                         jax.eval_shape(init))
    batch_abstract = {
        "image": jax.ShapeDtypeStruct(images.shape, images.dtype, sharding=rows),
        "labels": jax.ShapeDtypeStruct((batch, NUM_CLASSES), jnp.float32, sharding=rows)}
    step = jax.jit(update_fn, donate_argnums=0, out_shardings=(replicated, replicated))
    return step.lower(state, batch_abstract)


def vitpod_lowered(variant: str, batch: int, devices):
    """vitpod's train step with the same settings, lowered as `plan` lowers it."""
    from tests.conftest import load_config
    from vitpod.planning.compile import lower_train_step

    config = load_config(
        "vit_s16_i1k", model__variant=variant, batch_size=batch, total_steps=TOTAL_STEPS,
        model__dtype="bfloat16", model__gelu="tanh", model__pool="cls", model__posemb="learn",
        model__scan_layers=False, model__remat="none", mix__mixup_alpha=0.0,
        optim__warmup_steps=10_000)
    return lower_train_step(config, devices, NUM_CLASSES)[0]


def measure(lowered) -> dict:
    from vitpod.planning import cost

    start = time.time()
    est = cost.estimate(lowered)
    return {"seconds": est["seconds"], "bytes_accessed": est["bytes_accessed"],
            "flops": est["flops"], "temp_bytes": est["temp_bytes"],
            "compile_seconds": round(time.time() - start, 1)}


def main(argv) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(HERE))
    import jax
    import libtpu

    from vitpod.planning import cost
    from vitpod.planning.compile import tpu_devices

    triples = [FLAGS.rows[i:i + 3] for i in range(0, len(FLAGS.rows), 3)]
    versions = {"jax": jax.__version__, "libtpu": getattr(libtpu, "__version__", "unknown")}
    known = {}
    if FLAGS.out and os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            previous = json.load(f)
        if previous["versions"] == versions:
            known = {(r["variant"], r["topology"], r["global_batch"]): r for r in previous["rows"]}
    out = {"rows": [], "compiler_options": cost.COMPILER_OPTIONS, "versions": versions}
    lowerings = {"vitpod": vitpod_lowered, "reference": reference_lowered}
    for variant, topology, batch in triples:
        devices = tpu_devices(topology)
        row = {"variant": variant, "topology": topology, "global_batch": int(batch),
               "chips": len(devices)}
        for side, lower in lowerings.items():
            old = known.get((variant, topology, int(batch)), {})
            row[side] = measure(lower(variant, int(batch), devices)) if (
                side in FLAGS.sides or side not in old) else old[side]
        for key in ("seconds", "bytes_accessed", "temp_bytes", "flops"):
            row[f"{key}_ratio"] = round(row["vitpod"][key] / row["reference"][key], 4)
        print(json.dumps(row), file=sys.stderr, flush=True)
        out["rows"].append(row)
        if FLAGS.out:
            rows = {(r["variant"], r["topology"], r["global_batch"]): r for r in out["rows"]}
            with open(FLAGS.out, "w") as f:
                json.dump({**out, "rows": [*rows.values(), *(
                    r for k, r in known.items() if k not in rows)]}, f, indent=1)
        if FLAGS.markdown:  # after every row: an interrupted run keeps what it measured
            write_section(FLAGS.markdown, out)
    print(json.dumps(out))


def table(out: dict) -> list[str]:
    """One markdown row per (variant, topology, batch): both sides' figures and the ratios."""
    lines = ["| row (per chip) | vitpod: time, bytes, temporaries | reference: time, bytes, "
             "temporaries | time ratio | bytes ratio | temp ratio | target |",
             "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        sides = [f"{r[s]['seconds'] * 1e3:.2f} ms, {r[s]['bytes_accessed'] / 1e9:.2f} GB, "
                 f"{r[s]['temp_bytes'] / 2**30:.3f} GiB" for s in ("vitpod", "reference")]
        met = all(r[f"{k}_ratio"] <= v for k, v in TARGETS.items())
        lines.append(f"| {r['variant']}, batch {r['global_batch']}, {r['topology']} "
                     f"({r['chips']} chips) | {sides[0]} | {sides[1]} | "
                     f"{r['seconds_ratio']:.3f}x | {r['bytes_accessed_ratio']:.3f}x | "
                     f"{r['temp_bytes_ratio']:.3f}x | {'met' if met else 'not met'} |")
    return lines


def write_section(path: str, out: dict) -> None:
    """Replace (or append) SECTION of the markdown file at `path`."""
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    start = next((i for i, line in enumerate(lines) if line == SECTION), len(lines))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    flags_text = ", ".join(f"{k}={v}" for k, v in out["compiler_options"].items())
    body = [SECTION, "",
            f"`python benchmarks/tpu_step.py` ({time.strftime('%Y-%m-%d')}): both steps "
            f"compiled on this CPU for the topology with {flags_text}; jax "
            f"{out['versions']['jax']}, libtpu {out['versions']['libtpu']}. Figures are XLA's "
            "TPU cost-model estimates per chip (a memory-bound roofline, collectives priced as "
            "HBM traffic), not measurements. Target: time <= "
            f"{TARGETS['seconds']:.2f}x and temporaries <= {TARGETS['temp_bytes']:.1f}x the "
            "reference's (docs/tpu_step.md).", "", *table(out), ""]
    with open(path, "w") as f:
        f.write("\n".join([*lines[:start], *body, *lines[end:]]) + "\n")


if __name__ == "__main__":
    app.run(main)
