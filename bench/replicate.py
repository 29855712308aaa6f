"""The papers' own experiments at digits scale, in one rerunnable script (docs/REPLICATION.md).

    python bench/replicate.py --runs /work/runs --out docs/replication
           [--bpd-images 64] [--fid-samples 200] [--steps 1000,250,100,50,25,10]
           [--quality-steps 100] [--threads 1] [--only bpd,fid,curves,figures]

Evaluates whatever checkpoints exist: the bundled `digits` (L_simple, linear schedule, fixed
variance) and RUNS/NAME/last.safetensors for NAME in hybrid-linear, hybrid-cosine, kl-uniform,
kl-importance (skipped when absent; the step each was at is recorded). Writes into --out:

  bpd.json            test bits/dim (first --bpd-images held-out digits, seed 0) of every model
  quality.json        digits FID (fastddpm.digits_fid; --fid-samples samples, ancestral,
                      --quality-steps steps, noise seed 0) of every model, with the noise floor
  fid_vs_steps.json/.png  digits FID against sampling steps for the simple model with sigma^2 =
                      beta (fixedlarge) and betatilde (fixedsmall), and the hybrid learned-variance
                      model (IDDPM Fig. 8)
  vlb_terms.json/.png     the shipped model's VLB terms L_0..L_T (IDDPM Fig. 2); with the hybrid
                      models' terms in the JSON
  rate_distortion.json/.png  the shipped model's rate-distortion curve (DDPM Fig. 5, Table 4)
  training_curves.png, loss_noise.json  loss and loss by quartile of t from RUNS/*/log.jsonl,
                      and the step-to-step noise of the logged loss (IDDPM Fig. 6, sec. 3.3)
  samples-NAME.png    64 of each model's FID samples
  timings.json        seconds per piece

Each piece is cached in --out/cache under the checkpoint's content hash and the piece's
settings, so a rerun after more training recomputes only what changed. Runs on a CPU; all
randomness is seeded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

RUNS = ("hybrid-linear", "hybrid-cosine", "kl-uniform", "kl-importance")
FIG8 = (("simple, sigma^2 = beta (fixedlarge)", "digits", "fixedlarge"),
        ("simple, sigma^2 = betatilde (fixedsmall)", "digits", "fixedsmall"),
        ("hybrid, learned sigma", "hybrid-linear", None))


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.cache = self.out / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.models = self._discover()

    # ----------------------------------------------------------------------------- plumbing
    def _discover(self) -> dict:
        from fastddpm.checkpoint import bundled_path, load_checkpoint

        found = {"digits": str(bundled_path("digits"))}
        for name in RUNS if self.args.models is None else [m for m in RUNS if m in self.args.models.split(",")]:
            p = Path(self.args.runs) / name / "last.safetensors"
            if p.is_file():
                found[name] = str(p)
        models = {}
        for name, source in found.items():
            path = source
            # a run still training replaces last.safetensors every --save-every steps: evaluate a copy,
            # so that every piece of this run sees the same weights as the hash in its cache key
            data = Path(path).read_bytes()
            sha = hashlib.sha256(data).hexdigest()[:12]
            path = self.cache / f"ckpt-{name}-{sha}.safetensors"
            if not path.is_file():
                path.write_bytes(data)
            path = str(path)
            _, diffusion, meta = load_checkpoint(path)
            tc = meta.get("train_config", {})
            models[name] = {"checkpoint": path, "source": source, "sha": sha, "step": meta.get("step"),
                            "loss": tc.get("loss"), "schedule": tc.get("schedule"),
                            "timestep_sampler": tc.get("timestep_sampler"), "var_type": diffusion.var_type}
        return models

    def cached(self, key: str, fn):
        """fn() -> JSON-able, stored in cache/key.json; the time it took goes into timings."""
        f = self.cache / f"{key}.json"
        if f.is_file():
            return json.loads(f.read_text())
        start = time.perf_counter()
        value = fn()
        self.timings[key] = time.perf_counter() - start
        print(f"  {key}: {self.timings[key]:.0f} s", flush=True)
        f.write_text(json.dumps(value))
        return value

    def write(self, name: str, obj) -> None:
        from fastddpm.files import atomic_write_bytes

        text = json.dumps(obj, indent=1)
        if len(text) > 50_000:  # the per-timestep records: one line per record keeps the file small
            text = json.dumps(obj, separators=(",", ":")).replace("},{", "},\n{")
        atomic_write_bytes(self.out / name, (text + "\n").encode())

    # ----------------------------------------------------------------------------- pieces
    def bpd(self, name: str) -> dict:
        m, n = self.models[name], self.args.bpd_images

        def run():
            from fastddpm.bpd import BpdRequest, evaluate_bpd

            r = evaluate_bpd(BpdRequest(checkpoint=m["checkpoint"], data="digits", batch=n, limit=n, seed=0,
                                        device="cpu", out=None, progress=False))
            return {k: r[k] for k in ("bpd", "bpd_stderr", "prior_bpd", "images", "T", "per_timestep", "seconds")}
        return self.cached(f"bpd-{name}-{m['sha']}-n{n}", run)

    def fid(self, name: str, steps: int, var_type: str | None = None) -> dict:
        m, n = self.models[name], self.args.fid_samples
        v = var_type or m["var_type"]

        def run():
            from fastddpm.checkpoint import load_checkpoint
            from fastddpm.digits_fid import digits_fid
            from fastddpm.generate import respaced_for
            from fastddpm.images import save_grid, to_uint8
            from fastddpm.sampling import sample

            model, diffusion, _ = load_checkpoint(m["checkpoint"])
            diffusion.var_type = v  # a fixed-variance model samples with either fixed variance
            start = time.perf_counter()
            x = sample(model, respaced_for(diffusion, steps, "ancestral"), (n, 1, 8, 8), seed=0)
            seconds = time.perf_counter() - start
            images = to_uint8(x)
            if steps == self.args.quality_steps and var_type is None:
                save_grid(self.out / f"samples-{name}.png", images[:64])
            return {"fid": digits_fid(images), "n": n, "steps": steps, "var_type": v, "sample_seconds": seconds}
        from fastddpm.digits_fid import VERSION

        return self.cached(f"fid{VERSION}-{name}-{m['sha']}-{v}-s{steps}-n{n}", run)

    # ----------------------------------------------------------------------------- experiments
    def run_bpd(self) -> None:
        from fastddpm.plots import plot_rate_distortion, plot_vlb_terms
        from fastddpm.vlb_terms import rate_distortion_records, vlb_estimator_noise, vlb_term_records

        table = {}
        for name, m in self.models.items():
            r = self.bpd(name)
            table[name] = {"bpd": r["bpd"], "bpd_stderr": r["bpd_stderr"], "prior_bpd": r["prior_bpd"],
                           "images": r["images"], "vlb_estimator_noise": vlb_estimator_noise(r["per_timestep"]["vb"]),
                           **m}
        self.write("bpd.json", table)
        r = self.bpd("digits")
        pt = r["per_timestep"]
        terms = {"digits": vlb_term_records(pt["vb"], r["prior_bpd"])}
        for name in ("hybrid-linear", "hybrid-cosine"):
            if name in self.models:
                q = self.bpd(name)
                terms[name] = vlb_term_records(q["per_timestep"]["vb"], q["prior_bpd"])
        first = {k: {"share_of_bound_in_first_%d_steps" % s: sum(x["vb"] for x in v[:s]) / sum(x["vb"] for x in v)
                     for s in (1, 10, 50, 100)} for k, v in terms.items()}
        self.write("vlb_terms.json", {"images": r["images"], "summary": first, "terms": terms})
        plot_vlb_terms(terms["digits"], self.out / "vlb_terms.png",
                       title=f"VLB terms of the shipped digits model ({r['images']} test images)")
        rd = rate_distortion_records(pt["vb"], r["prior_bpd"], pt["xstart_mse"])
        self.write("rate_distortion.json", {"images": r["images"], "bpd": r["bpd"], "records": rd,
                                            "lossless": {"rate": r["bpd"], "distortion": 0.0}})
        plot_rate_distortion(rd, self.out / "rate_distortion.png",
                             title=f"Rate-distortion of the shipped digits model ({r['images']} test images)")

    def run_fid(self) -> None:
        from fastddpm.digits_fid import classifier_accuracy, noise_floor
        from fastddpm.plots import plot_series

        floor = noise_floor(self.args.fid_samples)
        floor["classifier_accuracy"] = classifier_accuracy()
        quality = {name: {**self.fid(name, self.args.quality_steps), **m} for name, m in self.models.items()}
        self.write("quality.json", {"noise_floor": floor, "models": quality})
        series, table = {}, {}
        for label, name, var in FIG8:
            if name not in self.models:
                continue
            pts = [self.fid(name, s, var) for s in self.args.steps]
            table[label] = {"model": name, "step": self.models[name]["step"], "points": pts}
            series[label] = ([p["steps"] for p in pts], [p["fid"] for p in pts])
        self.write("fid_vs_steps.json", {"noise_floor": floor, "series": table})
        plot_series(series, self.out / "fid_vs_steps.png", "sampling steps", "digits FID (lower is better)",
                    title=f"Digits FID against sampling steps ({self.args.fid_samples} samples)", logx=True,
                    hline=(floor["train_mean"], f"real digits, n={floor['train_n']} "
                                                f"(+- {floor['train_std']:.2f} by chance)"))

    def run_curves(self) -> None:
        from fastddpm.plots import plot_training_curves
        from fastddpm.train_curves import loss_noise, read_log

        runs, noise = {}, {}
        for name in RUNS:
            log = Path(self.args.runs) / name / "log.jsonl"
            if log.is_file():
                runs[name] = read_log(log)
                noise[name] = loss_noise(runs[name])
        if runs:
            plot_training_curves(runs, self.out / "training_curves.png",
                                 title="Training loss (tiny U-Net, digits)")
        self.write("loss_noise.json", noise)

    def run_summary(self) -> None:
        """summary.md: the tables of REPLICATION.md, filled from the JSON files of this folder."""
        def load(name):
            f = self.out / name
            return json.loads(f.read_text()) if f.is_file() else None

        lines = ["# Replication numbers (written by bench/replicate.py; do not edit)", ""]
        bpd, quality, fig8 = load("bpd.json"), load("quality.json"), load("fid_vs_steps.json")
        if bpd:
            q = (quality or {}).get("models", {})
            lines += ["| model | loss | schedule | t sampler | sigma | train step | test bits/dim (n) | "
                      f"digits FID @{self.args.quality_steps} steps | L_vlb estimate's rel. std from t: uniform / "
                      "importance |", "|---|---|---|---|---|---|---|---|---|"]
            for name, r in bpd.items():
                fid = f"{q[name]['fid']:.2f}" if name in q and q[name].get("sha") == r["sha"] else "-"
                en = r["vlb_estimator_noise"]
                lines.append(f"| {name} | {r['loss']} | {r['schedule']} | {r['timestep_sampler']} | {r['var_type']} "
                             f"| {r['step']} | {r['bpd']:.3f} +- {r['bpd_stderr']:.3f} ({r['images']}) | {fid} | "
                             f"{en['uniform']:.1f} / {en['importance']:.2f} |")
            lines.append("")
        if fig8:
            f = fig8["noise_floor"]
            steps = sorted({p["steps"] for v in fig8["series"].values() for p in v["points"]}, reverse=True)
            lines += ["| digits FID, %d samples | " % self.args.fid_samples + " | ".join(map(str, steps)) + " |",
                      "|---" * (len(steps) + 1) + "|"]
            for label, v in fig8["series"].items():
                by = {p["steps"]: p["fid"] for p in v["points"]}
                lines.append(f"| {label} (step {v['step']}) | " + " | ".join(
                    f"{by[s]:.2f}" if s in by else "-" for s in steps) + " |")
            lines += ["", f"Real digits the feature network never saw, n = {f['train_n']}: "
                          f"{f['train_mean']:.2f} +- {f['train_std']:.2f} "
                          f"(mean +- std over {f['train_repeats']} draws); "
                          f"two halves of the held-out set ({f['halves_n']} vs {f['halves_n']}): {f['halves']:.2f}; "
                          f"feature network accuracy on held-out digits {f['classifier_accuracy']:.3f}.", ""]
        noise, terms = load("loss_noise.json"), load("vlb_terms.json")
        if noise:
            lines += ["| run | last step | mean logged loss (2nd half) | relative step-to-step noise |",
                      "|---|---|---|---|"]
            lines += [f"| {k} | {v['last_step']} | {v['mean_loss']:.4g} | " + (
                "n/a" if v["relative_noise"] is None else f"{v['relative_noise']:.3f}") + " |"
                for k, v in noise.items()] + [""]
        if terms:
            lines += ["| model | share of the bound in L_0 | in L_0..L_9 | in L_0..L_49 | in L_0..L_99 |",
                      "|---|---|---|---|---|"]
            def order(key):  # "share_of_bound_in_first_10_steps" -> 10
                return int(key.split("_")[-2])
            lines += [f"| {k} | " + " | ".join(f"{v[key]:.3f}" for key in sorted(v, key=order)) + " |"
                      for k, v in terms["summary"].items()] + [""]
        rd = load("rate_distortion.json")
        if rd:
            recs = {r["t"]: r for r in rd["records"]}
            lines += ["| t | rate (bits/dim) | distortion (RMSE, 0..255) |", "|---|---|---|"]
            lines += [f"| {t} | {recs[t]['rate']:.4f} | {recs[t]['distortion']:.2f} |"
                      for t in (999, 750, 500, 250, 100, 50, 10, 1, 0) if t in recs]
            lines += [f"| lossless (after L_0) | {rd['lossless']['rate']:.4f} | 0 |", ""]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")

    def run_figures(self) -> None:
        here = Path(__file__).resolve().parent
        sys.path.insert(0, str(here))
        import paper_figures

        start = time.perf_counter()
        paper_figures.make_all("digits", self.out, seed=0)
        self.timings["paper_figures"] = time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="/work/runs")
    p.add_argument("--out", default="docs/replication")
    p.add_argument("--bpd-images", type=int, default=64)
    p.add_argument("--fid-samples", type=int, default=200)
    p.add_argument("--steps", default="1000,250,100,50,25,10")
    p.add_argument("--quality-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="bpd,fid,curves,figures,summary")
    p.add_argument("--models", default=None, help="only these runs (comma-separated; the bundled digits always)")
    a = p.parse_args(argv)
    a.steps = [int(s) for s in a.steps.split(",")]
    torch.set_num_threads(a.threads)
    from fastddpm.plots import require_matplotlib

    require_matplotlib()
    r = Runner(a)
    print("models:", {k: (v["step"], v["sha"]) for k, v in r.models.items()}, flush=True)
    start = time.perf_counter()
    for piece in a.only.split(","):
        getattr(r, f"run_{piece}")()
    old = json.loads((r.out / "timings.json").read_text()) if (r.out / "timings.json").is_file() else {}
    r.write("timings.json", {"pieces": {**old.get("pieces", {}), **r.timings}, "models": r.models,
                             "last_run_seconds": time.perf_counter() - start, "threads": a.threads})
    print(f"done in {time.perf_counter() - start:.0f} s; wrote {r.out}")


if __name__ == "__main__":
    main()
