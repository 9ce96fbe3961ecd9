"""Family comparison over a sweep's store: SAEs differing only in width are compared pairwise."""
from dataclasses import asdict

import yaml

from analysis.width_ladder import ladder_table
from orchestrator.plan import plan_sweep
from orchestrator.worker import train_pack


def test_ladder_table_compares_consecutive_widths_of_each_ladder(tmp_path):
    spec = {"name": "fam", "data": {"synthetic": {"d_in": 16, "n_features": 48, "active_per_vector": 3},
                                    "train_tokens": 8192, "eval_tokens": 1024},
            "grid": {"arch": ["topk"], "n_latents": [16, 32, 64], "k": [2, 4]},
            "train": {"batch_size": 512, "init_samples": 1024}, "eval": {"recovery": False}}
    path = tmp_path / "fam.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = plan_sweep(path, tmp_path / "results")
    sweep.store.save_spec(sweep.text)
    assert len(sweep.runs) == 6
    data = sweep.spec.model_dump(mode="json", exclude_unset=True)
    train_pack(data, [asdict(r) for r in sweep.runs], str(tmp_path / "results"))
    table = ladder_table(tmp_path / "results" / "fam")
    assert sorted(zip(table.k, table.n_small, table.n_large)) == [(2, 16, 32), (2, 32, 64), (4, 16, 32), (4, 32, 64)]
    assert ((table.novel_frac >= 0) & (table.novel_frac <= 1)).all()
    assert (table.mean_max_cos > 0).all() and (table.mean_max_cos <= 1 + 1e-6).all()
