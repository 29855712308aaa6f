"""The papers' own experiments at digits scale, with error bars, in one rerunnable script.

    python bench/replicate_runs.py --runs RUNS --steps 2000          # the 15 trainings (5 settings x 3 seeds)
    python bench/replicate.py --runs RUNS --out docs/replication --doc docs/REPLICATION.md
           [--seeds 0,1,2] [--noise-seeds 0,1,2,3,4] [--bpd-images 64] [--fid-samples 200]
           [--quality-steps 100] [--steps 100,50,25,10] [--threads 1] [--only bpd,fid,curves,doc]

Evaluates RUNS/SETTING-seedS/last.safetensors for every setting of bench/replicate_runs.py and
every training seed, and the bundled `digits` checkpoint (4,000 steps, seed 0) for reference.
All models of a setting are compared at the step they were trained to (the runs share one
budget; the step is recorded and checked). Writes into --out:

  bpd.json          test bits/dim of every model (first --bpd-images held-out digits, x_t seed 0:
                    every model sees the same images and the same x_t draws), per setting mean
                    +- SD over training seeds, and the paired comparisons the papers' claims need
  terms.json        VLB term shares (IDDPM Fig. 2), the L_vlb estimator's noise (IDDPM eq. 18)
                    per model, the decoder's floor, and rate-distortion with exact recovery at
                    the digits' 17 grey levels (DDPM sec. 4.3)
  quality.json      digits FID of every model at --quality-steps, one per noise seed
  fid_vs_steps.json digits FID against sampling steps (IDDPM Fig. 8): L_simple with sigma^2 =
                    beta and betatilde, L_hybrid learned; every training seed x noise seed
  curves.json       the noise of every run's logged plain loss and weighted objective
  *.png             vlb_terms, rate_distortion, fid_vs_steps, vlb_curves (IDDPM Fig. 6),
                    training_curves, samples-SETTING
  summary.md        the tables; --doc: docs/REPLICATION.md from bench/replication.md.in, every
                    verdict computed from these numbers (bench/replication_verdicts.py)

Every piece is cached in --out/cache under the checkpoint's content hash and the piece's
settings, so a rerun recomputes only what changed. CPU only; all randomness is seeded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from replicate_runs import SETTINGS, run_name  # noqa: E402

BPD_VERSION = 2  # bumped when the bpd record gains fields (v2: per-image totals, E[L_t^2], levels)
LEVELS = 17
BPD_PAIRS = (("hybrid-linear", "simple"), ("kl-uniform", "hybrid-linear"), ("kl-importance", "hybrid-linear"),
             ("kl-importance", "simple"), ("hybrid-cosine", "hybrid-linear"), ("kl-importance", "kl-uniform"))
QUALITY_PAIRS = (("hybrid-linear", "simple"), ("kl-uniform", "simple"), ("kl-importance", "simple"),
                 ("hybrid-cosine", "hybrid-linear"), ("kl-importance", "kl-uniform"))
FIG8 = (("simple", "fixedlarge", "L_simple, sigma^2 = beta_t"),
        ("simple", "fixedsmall", "L_simple, sigma^2 = betatilde_t"),
        ("hybrid-linear", None, "L_hybrid, learned sigma"))


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
        """name -> {checkpoint (a hashed copy), sha, step, setting, seed, ...}; settings with missing seeds are left out."""
        from fastddpm.checkpoint import bundled_path, load_checkpoint

        found = {"digits": (str(bundled_path("digits")), "bundled", 0)}
        for setting in SETTINGS:
            for seed in self.args.seeds:
                p = Path(self.args.runs) / run_name(setting, seed) / "last.safetensors"
                if p.is_file():
                    found[run_name(setting, seed)] = (str(p), setting, seed)
        models = {}
        for name, (source, setting, seed) in found.items():
            # evaluate a copy named by its hash: a run still training replaces last.safetensors
            data = Path(source).read_bytes()
            sha = hashlib.sha256(data).hexdigest()[:12]
            path = self.cache / f"ckpt-{name}-{sha}.safetensors"
            if not path.is_file():
                path.write_bytes(data)
            _, diffusion, meta = load_checkpoint(str(path))
            if setting != "bundled" and meta.get("step") != self.args.train_steps:
                print(f"{name}: at step {meta.get('step')}, not --train-steps {self.args.train_steps}: left out")
                continue
            tc = meta.get("train_config", {})
            models[name] = {"checkpoint": str(path), "source": source, "sha": sha, "step": meta.get("step"),
                            "setting": setting, "seed": seed, "loss": tc.get("loss"), "schedule": tc.get("schedule"),
                            "timestep_sampler": tc.get("timestep_sampler"), "var_type": diffusion.var_type}
        return models

    def seeds_of(self, setting: str) -> list[int]:
        return [m["seed"] for m in self.models.values() if m["setting"] == setting]

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
        if len(text) > 50_000:  # per-timestep records: one line per record keeps the file small
            text = json.dumps(obj, separators=(",", ":")).replace("},{", "},\n{")
        atomic_write_bytes(self.out / name, (text + "\n").encode())

    # ----------------------------------------------------------------------------- pieces
    def bpd(self, name: str) -> dict:
        m, n = self.models[name], self.args.bpd_images

        def run():
            from fastddpm.bpd import BpdRequest, evaluate_bpd

            r = evaluate_bpd(BpdRequest(checkpoint=m["checkpoint"], data="digits", batch=n, limit=n, seed=0,
                                        device="cpu", out=None, progress=False, levels=LEVELS))
            return {k: r[k] for k in ("bpd", "bpd_stderr", "prior_bpd", "images", "T", "per_timestep",
                                      "per_image_bpd", "seconds")}
        return self.cached(f"bpd{BPD_VERSION}-{name}-{m['sha']}-n{n}", run)

    def fid(self, name: str, steps: int, noise_seed: int, var_type: str | None = None) -> dict:
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
            x = sample(model, respaced_for(diffusion, steps, "ancestral"), (n, 1, 8, 8), seed=noise_seed)
            seconds = time.perf_counter() - start
            images = to_uint8(x)
            if steps == self.args.quality_steps and var_type is None and noise_seed == 0 and m["seed"] == 0:
                save_grid(self.out / f"samples-{m['setting']}.png", images[:64])
            return {"fid": digits_fid(images), "n": n, "steps": steps, "var_type": v, "noise_seed": noise_seed,
                    "sample_seconds": seconds}
        from fastddpm.digits_fid import VERSION

        return self.cached(f"fid{VERSION}-{name}-{m['sha']}-{v}-s{steps}-n{n}-seed{noise_seed}", run)

    # ----------------------------------------------------------------------------- experiments
    def run_bpd(self) -> None:
        from fastddpm.stats import mean_sd, paired_difference

        models = {}
        for name, m in self.models.items():
            r = self.bpd(name)
            models[name] = {**m, "bpd": r["bpd"], "bpd_stderr": r["bpd_stderr"], "images": r["images"],
                            "seconds": r["seconds"],
                            "L_0": r["per_timestep"]["vb"][0], "prior_bpd": r["prior_bpd"]}
        settings = {}
        for setting in SETTINGS:
            names = [run_name(setting, s) for s in self.seeds_of(setting)]
            if names:
                settings[setting] = {"seeds": self.seeds_of(setting), "steps": sorted({models[k]["step"] for k in names}),
                                     "bpd": mean_sd([models[k]["bpd"] for k in names]),
                                     "L_0": mean_sd([models[k]["L_0"] for k in names])}
        comparisons = {}
        for a, b in BPD_PAIRS:
            seeds = sorted(set(self.seeds_of(a)) & set(self.seeds_of(b)))
            if not seeds:
                continue
            per_seed = []
            for s in seeds:  # the same 64 images and x_t draws: a per-image paired difference
                pa, pb = self.bpd(run_name(a, s))["per_image_bpd"], self.bpd(run_name(b, s))["per_image_bpd"]
                per_seed.append({"seed": s, **paired_difference(pa, pb)})
            comparisons[f"{a} - {b}"] = {
                "a": a, "b": b, "seeds": seeds, "per_seed": per_seed,
                "over_seeds": paired_difference([models[run_name(a, s)]["bpd"] for s in seeds],
                                                [models[run_name(b, s)]["bpd"] for s in seeds])}
        self.write("bpd.json", {"images": self.args.bpd_images, "models": models, "settings": settings,
                                "comparisons": comparisons})

    def run_terms(self) -> None:
        """VLB term shares, estimator noise, the decoder floor and rate-distortion, all from the bpd records."""
        from fastddpm.checkpoint import load_checkpoint
        from fastddpm.data import load_digits
        from fastddpm.plots import plot_rate_distortion, plot_vlb_terms
        from fastddpm.stats import mean_sd
        from fastddpm.vlb_terms import (decoder_floor_bpd, exact_recovery, mean_image_distortion,
                                        rate_distortion_records, vlb_estimator_noise, vlb_term_records)

        n = self.args.bpd_images
        test = load_digits("test").images[:n]
        mean_line = mean_image_distortion(load_digits("train").images, test)
        _, diffusion, _ = load_checkpoint("digits")
        x0 = torch.from_numpy(test).permute(0, 3, 1, 2).double() / 127.5 - 1.0
        floor = decoder_floor_bpd(diffusion, x0)
        per_model, shares, rd = {}, {}, {}
        for name, m in self.models.items():
            r = self.bpd(name)
            pt = r["per_timestep"]
            vb = pt["vb"]
            total = sum(vb) + r["prior_bpd"]
            shares[name] = {f"first_{k}": sum(vb[:k]) / total for k in (1, 10, 50, 100)}
            per_model[name] = {"estimator_noise": vlb_estimator_noise(vb, pt["vb_sq"]), "shares": shares[name],
                               "L_0": vb[0], "setting": m["setting"], "seed": m["seed"]}
            if m["setting"] in ("simple", "bundled"):
                recs = rate_distortion_records(vb, r["prior_bpd"], pt["xstart_mse"], pt["level_accuracy"],
                                               pt["exact_fraction"])
                by_t = {q["t"]: q for q in recs}
                rd[name] = {"records": recs, "bpd": r["bpd"], "all_images": exact_recovery(recs, r["bpd"], 1.0),
                            "99%_of_images": exact_recovery(recs, r["bpd"], 0.99),
                            "at": {t: by_t[t] for t in (999, 750, 500, 250, 100, 50, 10, 2, 1, 0) if t in by_t},
                            "worse_than_mean_from_t": min((q["t"] for q in recs if q["distortion"] > mean_line),
                                                          default=None)}
        by_setting = {}
        for setting in SETTINGS:
            names = [k for k, v in per_model.items() if v["setting"] == setting]
            if names:
                by_setting[setting] = {
                    key: mean_sd([per_model[k]["estimator_noise"][key] for k in names])
                    for key in ("uniform", "importance", "importance_t_only", "variance_ratio")}
                by_setting[setting].update({f"share_{k}": mean_sd([shares[x][k] for x in names]) for k in shares[names[0]]})
                by_setting[setting]["L_0"] = mean_sd([per_model[k]["L_0"] for k in names])
        simple = [k for k in rd if self.models[k]["setting"] == "simple"]
        rd_summary = {key: mean_sd([rd[k][key]["bits_after_share"] for k in simple if rd[k][key]])
                      for key in ("all_images", "99%_of_images") if any(rd[k][key] for k in simple)}
        self.write("terms.json", {"images": n, "mean_image_distortion": mean_line, "decoder_floor": {
            "bpd": floor["bpd"], "variance": floor["variance"]}, "models": per_model, "settings": by_setting,
            "rate_distortion": rd, "rate_distortion_summary": rd_summary})
        plot_name = "simple-seed0" if "simple-seed0" in rd else "digits"
        terms = vlb_term_records(self.bpd(plot_name)["per_timestep"]["vb"], self.bpd(plot_name)["prior_bpd"])
        plot_vlb_terms(terms, self.out / "vlb_terms.png", title=f"VLB terms, {plot_name} ({n} test digits)")
        plot_rate_distortion(rd[plot_name]["records"], self.out / "rate_distortion.png", lossless=rd[plot_name]["bpd"],
                             mean_image=mean_line, title=f"Rate-distortion, {plot_name} ({n} test digits)")

    def run_fid(self) -> None:
        from fastddpm.digits_fid import classifier_accuracy, noise_floor
        from fastddpm.plots import plot_series
        from fastddpm.stats import mean_sd

        floor = noise_floor(self.args.fid_samples)
        floor["classifier_accuracy"] = classifier_accuracy()
        seeds = self.args.noise_seeds
        quality = {}
        for name in self.models:
            draws = [self.fid(name, self.args.quality_steps, j)["fid"] for j in seeds]
            quality[name] = {"per_noise_seed": draws, "summary": mean_sd(draws), "setting": self.models[name]["setting"],
                             "seed": self.models[name]["seed"], "step": self.models[name]["step"]}
        by_setting = {}
        for setting in SETTINGS:
            names = [run_name(setting, s) for s in self.seeds_of(setting)]
            if names:  # mean over noise seeds per training seed, then over training seeds
                by_setting[setting] = {"over_training_seeds": mean_sd([quality[k]["summary"]["mean"] for k in names]),
                                       "all_draws": mean_sd([d for k in names for d in quality[k]["per_noise_seed"]])}
        comparisons = {}
        for a, b in QUALITY_PAIRS:
            ks = sorted(set(self.seeds_of(a)) & set(self.seeds_of(b)))
            if ks:
                comparisons[f"{a} - {b}"] = two_level({k: quality[run_name(a, k)]["per_noise_seed"] for k in ks},
                                                      {k: quality[run_name(b, k)]["per_noise_seed"] for k in ks})
        self.write("quality.json", {"noise_floor": floor, "steps": self.args.quality_steps, "noise_seeds": seeds,
                                    "models": quality, "settings": by_setting, "comparisons": comparisons})
        series = {}
        for setting, var, label in FIG8:
            train_seeds = self.seeds_of(setting)
            if not train_seeds:
                continue
            grid = {s: {k: [self.fid(run_name(setting, k), s, j, var)["fid"] for j in seeds] for k in train_seeds}
                    for s in self.args.steps}
            series[label] = {"setting": setting, "variance": var or "learned", "train_seeds": train_seeds,
                             "points": {str(s): {"per_seed": grid[s],
                                                 "summary": mean_sd([d for k in grid[s] for d in grid[s][k]])}
                                        for s in self.args.steps}}
        comparisons = {}
        learned = series.get("L_hybrid, learned sigma")
        for label in ("L_simple, sigma^2 = beta_t", "L_simple, sigma^2 = betatilde_t"):
            if learned and label in series:
                comparisons[f"learned - {label.split('= ')[1]}"] = {
                    str(s): two_level(learned["points"][str(s)]["per_seed"], series[label]["points"][str(s)]["per_seed"])
                    for s in self.args.steps}
        self.write("fid_vs_steps.json", {"noise_floor": floor, "noise_seeds": seeds, "series": series,
                                         "comparisons": comparisons})
        plot_series({label: ([int(s) for s in v["points"]], [p["summary"]["mean"] for p in v["points"].values()])
                     for label, v in series.items()}, self.out / "fid_vs_steps.png", "sampling steps",
                    "digits FID (lower is better)", logx=True,
                    errors={label: [p["summary"]["sd"] for p in v["points"].values()] for label, v in series.items()},
                    title=f"Digits FID against sampling steps ({self.args.fid_samples} samples)\nmean +- SD over "
                          f"{len(seeds)} noise x {len(self.args.seeds)} training seeds",
                    hline=(floor["train_mean"], f"real digits, n={floor['train_n']} (+- {floor['train_std']:.2f})"))

    def run_curves(self) -> None:
        from fastddpm.plots import plot_training_curves
        from fastddpm.stats import mean_sd, paired_difference
        from fastddpm.train_curves import loss_noise, read_log

        runs, colours, noise = {}, {}, {}
        for i, setting in enumerate(SETTINGS):
            for seed in self.args.seeds:
                log = Path(self.args.runs) / run_name(setting, seed) / "log.jsonl"
                if log.is_file():
                    name = run_name(setting, seed)
                    runs[name] = read_log(log)
                    colours[name] = f"C{i}"
                    speed = sorted(r["images_per_s"] for r in runs[name] if r.get("images_per_s"))
                    noise[name] = {"loss": loss_noise(runs[name]), "loss_weighted": loss_noise(runs[name], "loss_weighted"),
                                   "setting": setting, "seed": seed,
                                   "median_images_per_s": speed[len(speed) // 2] if speed else None}
        if not runs:
            return
        kl = {k: v for k, v in runs.items() if k.startswith("kl-")}
        if kl:
            plot_training_curves(kl, self.out / "vlb_curves.png", quantities=("loss_weighted", "loss"),
                                 colours=colours, title="L_vlb training: uniform vs importance-sampled t (IDDPM Fig. 6)")
        plot_training_curves(runs, self.out / "training_curves.png", quantities=("mse", "vb"), colours=colours,
                             title="All runs: eps-prediction error and the VLB term of the drawn t")
        by_setting = {}
        for setting in SETTINGS:
            names = [k for k, v in noise.items() if v["setting"] == setting]
            if names:
                by_setting[setting] = {key: mean_sd([noise[k][key]["relative_noise"] for k in names
                                                     if noise[k][key]["relative_noise"] is not None] or [float("nan")])
                                       for key in ("loss", "loss_weighted")}
                by_setting[setting]["objective_2nd_half"] = mean_sd(
                    [noise[k]["loss_weighted"]["mean_loss"] for k in names if noise[k]["loss_weighted"]["mean_loss"]]
                    or [float("nan")])
        seeds = sorted(set(v["seed"] for k, v in noise.items() if v["setting"] == "kl-uniform")
                       & set(v["seed"] for k, v in noise.items() if v["setting"] == "kl-importance"))
        comparison = None
        if seeds:
            comparison = paired_difference(
                [noise[run_name("kl-importance", s)]["loss_weighted"]["relative_noise"] for s in seeds],
                [noise[run_name("kl-uniform", s)]["loss_weighted"]["relative_noise"] for s in seeds])
        self.write("curves.json", {"runs": noise, "settings": by_setting, "importance_minus_uniform_noise": comparison})

    def run_doc(self) -> None:
        import replication_verdicts

        tables, doc = replication_verdicts.render(self.out, self.args)
        (self.out / "summary.md").write_text(tables)
        if self.args.doc:
            Path(self.args.doc).write_text(doc)
            print(f"wrote {self.args.doc}")


def two_level(a: dict, b: dict) -> dict:
    """Paired FID differences a - b over training seeds k and noise seeds j (a[k][j], b[k][j]: the same
    x_T for the same j): the mean over noise seeds per training seed, then the paired difference over
    training seeds (the SE that counts when comparing trainings), beside the SE over all k x j draws."""
    from fastddpm.stats import paired_difference

    ks = sorted(set(a) & set(b), key=int)
    seed_means_a = [sum(a[k]) / len(a[k]) for k in ks]
    seed_means_b = [sum(b[k]) / len(b[k]) for k in ks]
    return {"over_training_seeds": paired_difference(seed_means_a, seed_means_b),
            "over_draws": paired_difference([x for k in ks for x in a[k]], [x for k in ks for x in b[k]]),
            "per_seed": {k: paired_difference(a[k], b[k]) for k in ks}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="/work/runs/rep")
    p.add_argument("--out", default="docs/replication")
    p.add_argument("--doc", default=None, help="also write this Markdown page (docs/REPLICATION.md)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds")
    p.add_argument("--train-steps", type=int, default=2000, help="the runs' common step budget (others are left out)")
    p.add_argument("--noise-seeds", default="0,1,2,3,4", help="sampling noise seeds of every FID point")
    p.add_argument("--bpd-images", type=int, default=64)
    p.add_argument("--fid-samples", type=int, default=200)
    p.add_argument("--steps", default="100,50,25,10")
    p.add_argument("--quality-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="bpd,terms,fid,curves,doc")
    p.add_argument("--earlier", default=None, metavar="DIR",
                   help="the output folder of the same runs at an earlier common budget: the page compares the two")
    a = p.parse_args(argv)
    a.steps = [int(s) for s in a.steps.split(",")]
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.noise_seeds = [int(s) for s in a.noise_seeds.split(",")]
    if len(a.noise_seeds) < 5:
        p.error("every FID point needs at least 5 noise seeds (--noise-seeds)")
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
