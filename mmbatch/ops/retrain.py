"""`mmbatch retrain`: one idempotent retraining cycle, safe to run from cron.

1. preprocess (only new or changed units are processed: preprocess skips committed ones);
2. if the fused features' fingerprint equals the champion's recorded one (and
   ``retrain.force_train`` is off): "no new data", stop. Likewise when this
   data was already trained with this training config and that candidate lost:
   a rerun does not train the same candidate again;
3. train a candidate (warm-started from the champion when ``retrain.warm_start``);
4. score candidate and champion on the same held-out split (``test``) of the
   current features;
5. register the candidate; promote it when
   ``score(candidate) >= score(champion) + retrain.margin`` on ``retrain.metric``.
   The first model becomes champion. A champion that cannot be scored on the
   current features (e.g. their layout changed) is kept, and the reason is
   recorded: promote by hand with ``mmbatch registry promote``.

The whole cycle runs under the registry lock: a second cycle started meanwhile
(cron overlap, a colleague) exits at once with a message naming the holder.
Every outcome is written to ``<registry>/last_cycle.json``; registrations and
promotions go to the registry history. When MLflow is importable and
``MLFLOW_TRACKING_URI`` is set, the cycle is also logged as an MLflow run.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from mmbatch.engine import storage
from mmbatch.config import NOT_LEARNING, Workflow
from mmbatch.errors import UsageError
from mmbatch.ops.registry import ModelVersion, Registry

log = logging.getLogger("mmbatch.retrain")

EPS = 1e-12                      # float slack in the promotion comparison
EVAL_SPLIT = "test"

NO_NEW_DATA = "no_new_data"
ALREADY_EVALUATED = "already_evaluated"
PROMOTED = "promoted"
KEPT_CHAMPION = "kept_champion"


@dataclass
class Decision:
    promote: bool
    reason: str
    candidate_score: Optional[float] = None
    champion_score: Optional[float] = None


@dataclass
class RetrainResult:
    status: str                                   # no_new_data | already_evaluated | promoted | kept_champion
    reason: str
    champion: Optional[str] = None                # champion after the cycle
    previous_champion: Optional[str] = None
    version: Optional[str] = None                 # candidate registered in this cycle
    metric: str = "accuracy"
    margin: float = 0.0
    candidate_metrics: dict = field(default_factory=dict)
    champion_metrics: Optional[dict] = None
    fingerprints: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)
    train_run: Optional[str] = None               # the training run folder of the candidate
    elapsed: float = 0.0

    @property
    def promoted(self) -> bool:
        return self.status == PROMOTED

    def to_dict(self) -> dict:
        return asdict(self)


# --- the decision (pure) ------------------------------------------------------------------
def decide(candidate: dict, champion: Optional[dict], metric: str, margin: float,
           has_champion: bool, champion_error: Optional[str] = None) -> Decision:
    """Promote when there is no champion, or candidate >= champion + margin on ``metric``."""
    if metric not in candidate or candidate[metric] is None:
        raise UsageError(f"candidate metrics have no {metric!r} (got {sorted(candidate)})")
    c = float(candidate[metric])
    if not has_champion:
        return Decision(True, f"first model: becomes champion ({metric} {c:.4f})", c, None)
    if champion_error or champion is None or champion.get(metric) is None:
        why = champion_error or f"no {metric!r} in its metrics"
        return Decision(False, f"champion could not be scored on the current features ({why}); "
                               "kept it: promote by hand if the candidate should replace it", c, None)
    h = float(champion[metric])
    need = h + margin
    if c + EPS >= need:
        return Decision(True, f"{metric} {c:.4f} >= champion {h:.4f} + margin {margin:g}", c, h)
    return Decision(False, f"{metric} {c:.4f} < champion {h:.4f} + margin {margin:g}", c, h)


def train_fingerprint(wf: Workflow) -> str:
    """What, besides the data, decides the candidate: the learning settings of ``train`` and, with
    ``retrain.audit: exclude``, the audit's settings (they decide the rows left out)."""
    rec = {k: v for k, v in wf.train_record().items() if k not in NOT_LEARNING}
    if wf.retrain.audit == "exclude":
        rec["audit"] = wf.audit.model_dump(mode="json", exclude={"out", "cpus_per_task"})
    return storage.fingerprint(rec)


def candidate_run_name(wf: Workflow, fingerprints: dict, champion: Optional[ModelVersion],
                       warm: bool) -> str:
    """``<train.name>-d<data>-t<train>[-from-vN][-<time>]``: one training run per candidate.

    A cycle that dies mid-training and is rerun on the same data gets the same
    name, so training resumes from its checkpoints instead of starting over;
    ``force_train`` adds the time, so it always trains afresh.
    """
    parts = [wf.train.name, "d" + fingerprints["features"][:8], "t" + fingerprints["train"][:6]]
    if warm and champion is not None:
        parts.append(f"from-{champion.version}")
    if wf.retrain.force_train:
        parts.append(time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    return "-".join(parts)


# --- registering the outcome (tested without the other stages) ----------------------------
def conclude_cycle(registry: Registry, wf: Workflow, candidate_model_dir: str, candidate_metrics: dict,
                   champion: Optional[ModelVersion], champion_metrics: Optional[dict],
                   fingerprints: dict, champion_error: Optional[str] = None,
                   train_metrics: Optional[dict] = None, preprocess: Optional[dict] = None,
                   train_run: Optional[str] = None) -> RetrainResult:
    """Register the candidate, promote it if it wins, record the cycle; returns the result.

    Takes already computed held-out metrics for the candidate and the champion.
    Call it with the registry lock held (it takes the lock itself otherwise).
    """
    cfg = wf.retrain
    d = decide(candidate_metrics, champion_metrics, cfg.metric, cfg.margin,
               has_champion=champion is not None, champion_error=champion_error)
    with registry.lock():
        extra = {"decision": {"promote": d.promote, "reason": d.reason, "metric": cfg.metric,
                              "margin": cfg.margin, "candidate_score": d.candidate_score,
                              "champion_score": d.champion_score},
                 "champion_at_training": champion.version if champion else None,
                 "champion_metrics": champion_metrics, "eval_split": EVAL_SPLIT,
                 "train_metrics": storage.jsonable(train_metrics or {}), "train_run": train_run,
                 "preprocess": preprocess or {}}
        version = registry.register(candidate_model_dir, metrics=candidate_metrics, fingerprints=fingerprints,
                                    workflow=wf, extra=extra)
        if d.promote:
            registry.promote(version, reason=f"retrain: {d.reason}")
        result = RetrainResult(
            status=PROMOTED if d.promote else KEPT_CHAMPION, reason=d.reason,
            champion=version if d.promote else (champion.version if champion else None),
            previous_champion=champion.version if champion else None, version=version,
            metric=cfg.metric, margin=cfg.margin, candidate_metrics=dict(candidate_metrics),
            champion_metrics=dict(champion_metrics) if champion_metrics else None,
            fingerprints=dict(fingerprints), preprocess=preprocess or {}, train_run=train_run)
        registry.write_last_cycle(_cycle_record(result))
    return result


# --- the cycle --------------------------------------------------------------------------------
def run_retrain(wf: Workflow, lock_timeout: float = 0.0, allow_incomplete: bool = False) -> RetrainResult:
    """One retraining cycle (see the module docstring); prints a short summary."""
    from mmbatch.preprocess import run_preprocess
    from mmbatch.train.evaluate import evaluate_model
    from mmbatch.train.run import run_training

    from mmbatch.engine import ownership
    from mmbatch.preprocess.run import workflow_inputs

    t0 = time.time()
    cfg = wf.retrain
    ownership.check_disjoint({"retrain.registry": cfg.registry, "output.path": wf.output.path,
                              "train.out": wf.train.out,
                              **({"audit.out": wf.audit_out()} if cfg.audit != "off" else {})}, workflow_inputs(wf))
    ownership.claim(cfg.registry, "registry", wf.name)
    registry = Registry(cfg.registry)
    with registry.lock(timeout=lock_timeout):
        summary = run_preprocess(wf)
        pre = {k: storage.jsonable(getattr(summary, k, None))
               for k in ("out", "fingerprint", "shards_processed", "shards_skipped", "rows_out", "quarantined")}
        fps = {"features": summary.fingerprint, "train": train_fingerprint(wf)}
        champion = registry.champion()

        early = _early_exit(registry, wf, champion, fps, pre)
        if early is not None:
            early.elapsed = time.time() - t0
            registry.write_last_cycle(_cycle_record(early))
            _report(early)
            _log_mlflow(wf, early)
            return early

        warm = champion.model_uri if (cfg.warm_start and champion is not None) else None
        twf = wf.model_copy(deep=True)
        pre["audit"] = audit_step(twf, allow_incomplete)
        twf.train.name = candidate_run_name(wf, fps, champion, warm is not None)
        trained = run_training(twf, warm_start=warm, baselines=False, allow_incomplete=allow_incomplete)
        data = wf.train_data()
        cand_metrics = _scalars(evaluate_model(trained.model_dir, data, split=EVAL_SPLIT,
                                               allow_incomplete=allow_incomplete))
        champ_metrics, champ_error = None, None
        if champion is not None:
            try:
                champ_metrics = _scalars(evaluate_model(champion.model_uri, data, split=EVAL_SPLIT,
                                                        allow_incomplete=allow_incomplete))
            except Exception as e:  # e.g. the feature layout changed since the champion was trained
                champ_error = f"{type(e).__name__}: {e}"
                log.warning("could not score champion %s: %s", champion.version, champ_error)
        result = conclude_cycle(registry, wf, trained.model_dir, cand_metrics, champion, champ_metrics, fps,
                                champion_error=champ_error, train_metrics=_scalars(getattr(trained, "metrics", {})),
                                preprocess=pre, train_run=getattr(trained, "run_dir", twf.train.name))
        result.elapsed = time.time() - t0
    _report(result)
    _log_mlflow(wf, result)
    return result


def audit_step(wf: Workflow, allow_incomplete: bool = False) -> Optional[dict]:
    """``retrain.audit``: off (None); report: `mmbatch audit` of the new features into ``wf.audit_out()``;
    exclude: also set ``wf.train.exclude`` to its issues.parquet, so the candidate trains without the
    flagged train/validation rows. Returns the audit's counts and folder."""
    if wf.retrain.audit == "off":
        return None
    if wf.retrain.audit == "exclude" and wf.train.exclude:
        raise UsageError("retrain.audit: exclude sets train.exclude to the audit's issues; train.exclude is "
                         f"already {wf.train.exclude}: unset one of them")
    from mmbatch.audit.run import ISSUES, run_audit

    out = wf.audit_out()
    res = run_audit(wf, out, allow_incomplete=allow_incomplete)
    record = {"out": out, "mode": wf.retrain.audit, "flagged": res.flagged, "counts": res.summary["counts"]}
    print(f"retrain: audit flagged {res.flagged} row(s) ({out})", flush=True)
    if wf.retrain.audit == "exclude":
        wf.train.exclude = storage.join(out, ISSUES)
    return record


def _early_exit(registry: Registry, wf: Workflow, champion: Optional[ModelVersion], fps: dict,
                pre: dict) -> Optional[RetrainResult]:
    cfg = wf.retrain
    if cfg.force_train:
        return None
    base = dict(champion=champion.version if champion else None,
                previous_champion=champion.version if champion else None,
                metric=cfg.metric, margin=cfg.margin, fingerprints=fps, preprocess=pre)
    if champion is not None and champion.fingerprints.get("features") == fps["features"]:
        return RetrainResult(status=NO_NEW_DATA, reason=f"no new data: features {fps['features']} are those "
                             f"champion {champion.version} was trained on", **base)
    tried = registry.find(features=fps["features"], train=fps["train"])
    if tried:
        last = tried[-1]
        why = (last.extra.get("decision") or {}).get("reason", "") if isinstance(last.extra, dict) else ""
        return RetrainResult(status=ALREADY_EVALUATED, version=last.version,
                             reason=f"no new data since {last.version} was trained on these features with this "
                                    f"training config (not promoted: {why}); set retrain.force_train=true "
                                    "to train again", **base)
    return None


def _cycle_record(r: RetrainResult) -> dict:
    return {"status": r.status, "reason": r.reason, "version": r.version, "champion": r.champion,
            "previous_champion": r.previous_champion, "metric": r.metric, "margin": r.margin,
            "candidate_metrics": r.candidate_metrics, "champion_metrics": r.champion_metrics,
            "fingerprints": r.fingerprints, "preprocess": r.preprocess, "train_run": r.train_run,
            "elapsed": r.elapsed}


def _report(r: RetrainResult) -> None:
    if r.status in (NO_NEW_DATA, ALREADY_EVALUATED):
        print(f"retrain: {r.reason}; champion stays {r.champion or 'none'}", flush=True)
        return
    verb = "promoted" if r.promoted else "registered, not promoted"
    print(f"retrain: candidate {r.version} {verb}: {r.reason}; champion is {r.champion}", flush=True)


def _scalars(metrics: Any) -> dict:
    """The JSON-able scalar metrics of an evaluate_model result (a dict or an object)."""
    if not isinstance(metrics, dict):
        metrics = getattr(metrics, "__dict__", {}) or {}
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[str(k)] = float(v)
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            out[str(k)] = float(v.item())
    return out


def _log_mlflow(wf: Workflow, r: RetrainResult) -> None:
    """Log the cycle to MLflow when it is installed and MLFLOW_TRACKING_URI is set (never fails the cycle)."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    try:
        import mlflow
    except ImportError:
        return
    try:
        mlflow.set_experiment(f"mmbatch-{wf.name}")
        with mlflow.start_run(run_name=f"retrain-{r.version or r.status}"):
            mlflow.set_tags({"mmbatch.status": r.status, "mmbatch.version": r.version or "",
                             "mmbatch.champion": r.champion or "", "mmbatch.registry": wf.retrain.registry})
            mlflow.log_params({"metric": r.metric, "margin": r.margin, "warm_start": wf.retrain.warm_start,
                               "features_fingerprint": r.fingerprints.get("features", ""),
                               "train_fingerprint": r.fingerprints.get("train", "")})
            metrics = {f"candidate_{k}": v for k, v in r.candidate_metrics.items()}
            metrics.update({f"champion_{k}": v for k, v in (r.champion_metrics or {}).items()})
            metrics["promoted"] = 1.0 if r.promoted else 0.0
            mlflow.log_metrics(metrics)
    except Exception as e:  # tracking is optional: a down server must not fail the cycle
        log.warning("MLflow logging failed: %s", e)
