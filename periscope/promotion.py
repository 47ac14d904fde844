"""Promote a candidate model only if it beats the live one, on trips neither has seen.

``train_model.py --promote-if-better`` and the retraining DAG's
``evaluate_and_promote`` task call ``compare_and_promote``. A fair comparison
scores both models on the same trips, none of which either trained on:

* a live model trained with the same ``--split id`` (same seed and fraction)
  held out the same trip ids, so the candidate's hold-out is fair as it is;
* otherwise the live model's own hold-out files (``holdout.csv.gz``...) say which trips it did
  not see, and only the trips of the candidate's hold-out that are also in it
  count (matched by base id: a replayed copy of a training trip is seen);
* without that file the comparison still runs, and the decision says that the
  live model may have seen some of the trips.

The decision, both scores and the reason are written to the candidate's
``decision.json``; every version stays on disk either way, and the switch of
``model/current.json`` is atomic (``periscope.model.promote``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from periscope.model import (ModelMismatchError, current_version, labelled_metrics, load_model,
                             promote, read_metadata, version_dir)
from periscope.storage import atomic_write_json
from periscope.training_data import HOLDOUT_FILES, base_id, read_holdout

DECISION = "decision.json"
"""The file in the candidate's version directory that records the decision."""


def unseen_by_both(model_dir: Path, live: str | None, candidate: str,
                   holdout: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The part of the candidate's hold-out that the live model did not train on either, and
    how it was found (said in the decision)."""
    if live is None or live == candidate:
        return holdout, "the candidate's hold-out"
    cand = read_metadata(model_dir, candidate)["training_data"]
    seen = read_metadata(model_dir, live)["training_data"]
    same = ("split", "seed", "holdout_fraction")
    if cand.get("split") == "id" and all(seen.get(key) == cand.get(key) for key in same):
        return holdout, "the candidate's hold-out (the live model held out the same trip ids)"
    live_dir = version_dir(model_dir, live)
    if not any((live_dir / name).exists() for name in HOLDOUT_FILES.values()):
        return holdout, (f"the candidate's hold-out; the live model's training trips are unknown "
                         f"(no {HOLDOUT_FILES['coordinates']}), so it may have seen some of them")
    unseen = {base_id(i) for i in read_holdout(live_dir)["id"].tolist()}
    keep = np.fromiter((base_id(i) in unseen for i in holdout["id"].tolist()), dtype=bool,
                       count=len(holdout))
    return holdout[keep], (f"the trips of the candidate's hold-out that are also in {live}'s "
                           "hold-out (seen by neither)")


def compare_and_promote(model_dir: Path, candidate: str, holdout: pd.DataFrame,
                        min_improvement: float = 0.0) -> dict[str, Any]:
    """Score both models on the same trips; promote the candidate only if it is better.

    Better means a hold-out RMSLE lower by more than ``min_improvement``. A
    live model that this code cannot load (other features) is replaced. The
    returned decision is also written to the candidate's ``decision.json``.
    """
    live = current_version(model_dir)
    holdout, holdout_note = unseen_by_both(model_dir, live, candidate, holdout)
    scores: dict[str, Any] = {candidate: labelled_metrics(load_model(model_dir, candidate),
                                                          holdout)}
    if live is None:
        promoted, reason = True, "no live model yet"
    elif len(holdout) == 0:
        promoted, reason = False, (f"no hold-out trip that neither model trained on "
                                   f"({holdout_note}): cannot compare")
    elif live == candidate:
        promoted, reason = True, "the candidate is already live"
    else:
        try:
            scores[live] = labelled_metrics(load_model(model_dir, live), holdout)
        except ModelMismatchError as error:
            scores[live] = None
            promoted, reason = True, f"the live model {live} cannot be used with this code: {error}"
        else:
            new, old = scores[candidate]["rmsle"], scores[live]["rmsle"]
            promoted = new < old - min_improvement
            reason = (f"hold-out RMSLE {new:.4f} vs {old:.4f} of the live {live}: "
                      + ("better" if promoted else "not better")
                      + (f" by more than {min_improvement:g}" if min_improvement else ""))
    if promoted:
        promote(model_dir, candidate)
    decision = {"candidate": candidate, "previous_live": live, "promoted": promoted,
                "live": candidate if promoted else live, "reason": reason,
                "holdout_rows": int(len(holdout)), "holdout": holdout_note,
                "min_improvement": min_improvement, "scores": scores}
    atomic_write_json(version_dir(model_dir, candidate) / DECISION, decision)
    return decision
