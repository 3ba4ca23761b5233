"""Regenerates tests/data/peer_reference_attacks.json: the peers' own attack outputs on fixed inputs.

Run ONCE (the JSON is committed; the tests never need torch or the peers):

    # a CPU torch beside numpy, scipy and scikit-learn < 1.4 (Blades' clipped-clustering attack
    # passes AgglomerativeClustering(affinity=...), removed in 1.4), in a throw-away venv
    python3.11 -m venv /tmp/peerref-venv
    /tmp/peerref-venv/bin/pip install "torch==2.13.0+cpu" numpy scipy "scikit-learn<1.4"
    # the peers' sources at the commits below
    git clone https://github.com/LPD-EPFL/byzfl /tmp/peers/byzfl
    git -C /tmp/peers/byzfl checkout 69bd1ac0116fa7ff9eaf6d8ae049650d8e5f7e55
    git clone https://github.com/lishenghui/blades /tmp/peers/blades
    git -C /tmp/peers/blades checkout 711e8dfe535261155f6a991d9e0cc766831c0fa1
    /tmp/peerref-venv/bin/python tests/data/make_peer_reference_attacks.py \
        --byzfl /tmp/peers/byzfl --blades /tmp/peers/blades

(The committed file was made with torch 2.13.0+cpu, numpy 2.x, scipy 1.x, scikit-learn 1.3.2.)

Peers and what is taken from them (only the files named are imported or parsed; nothing is
copied into jbyz):

* ByzFL, LPD-EPFL/byzfl at 69bd1ac0116fa7ff9eaf6d8ae049650d8e5f7e55 (2025-06-06):
  ``byzfl/attacks/attacks.py`` ``Optimal_ALittleIsEnough`` and
  ``Optimal_InnerProductManipulation`` with ByzFL's own aggregators and pre-aggregators
  (``byzfl/aggregators``), on numpy float64 inputs (honest rows; ByzFL appends the ``f``
  Byzantine copies after them). Each case records the jbyz names of the same stages.
* Blades, lishenghui/blades at 711e8dfe535261155f6a991d9e0cc766831c0fa1 (2025-02-16):
  ``blades/adversaries/adaptive_adversary.py`` ``AdaptiveAdversary._attack_median_and_trimmedmean``
  (Fang et al.'s attack on trimmed mean / median), ``signguard_adversary.py``
  ``SignGuardAdversary._attack_sign_guard`` and ``attackclippedclustering_adversary.py``
  ``AttackclippedclusteringAdversary._chain_attack``. Their modules import Blades' engine
  (fedlib) and ray, so only these methods' sources are taken (``ast``, unchanged) and run with
  a stand-in ``self`` / trainer that hands them the honest updates and collects what they send.
  Their randomness (``torch.rand``, ``torch.randperm``) is replaced by recorded uniforms and a
  recorded permutation, stored with the case: the test feeds the same numbers to jbyz's
  deterministic cores (``fang_trim_values``, ``signguard_values``).
* Fang et al.'s Krum attack (USENIX Security 2020, Sec. 4.2) has no released peer that follows
  the paper (Blades' former ``FangattackAdversary.attack_multikrum`` was never wired and
  aggregates ``n + f`` rows), so its reference below, ``np_fang_krum``, is a literal numpy
  transcription of the paper's algorithm in update space, written for this file.

Inputs are float32 numbers (stored exactly), so jbyz's float32 kernels see the same values.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import pathlib
import sys
import types

import numpy as np

PEERS = {
    "byzfl": "LPD-EPFL/byzfl@69bd1ac0116fa7ff9eaf6d8ae049650d8e5f7e55",
    "blades": "lishenghui/blades@711e8dfe535261155f6a991d9e0cc766831c0fa1",
    "fang_krum": "numpy transcription of Fang et al., USENIX Security 2020, Sec. 4.2 (this file)",
}
OUT = pathlib.Path(__file__).with_name("peer_reference_attacks.json")


def sample(seed: int, n: int, d: int, offset: float = 0.5, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = scale * (rng.normal(size=(n, d)) + offset)
    return x.astype(np.float32).astype(np.float64)


def method_source(path: pathlib.Path, cls: str, method: str) -> str:
    """The source of ``cls.method`` in ``path``, dedented to a module-level function."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return ast.unparse(item)
    raise LookupError(f"{cls}.{method} not in {path}")


class TorchWithRecordedRandomness:
    """``torch`` with ``rand`` / ``randperm`` answering from recorded arrays (in call order)."""

    def __init__(self, torch, rands, perm=None):
        self._torch, self._rands, self._perm = torch, list(rands), perm

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def rand(self, k, device=None):
        r = self._rands.pop(0)
        assert len(r) == int(k), (len(r), k)
        return self._torch.tensor(r, dtype=self._torch.float64)

    def randperm(self, k):
        assert len(self._perm) == int(k)
        return self._torch.tensor(self._perm, dtype=self._torch.long)


def np_fang_krum(h: np.ndarray, n: int, c: int, f: int, center: str, threshold=1e-5,
                 max_halvings=64) -> np.ndarray:
    """Fang et al., Sec. 4.2, in update space (float64, explicit loops): ``h`` the honest rows,
    ``n`` workers of which ``c`` Byzantine, Krum told ``f``. Returns the crafted vector."""
    m, d = n, h.shape[1]
    mu = h.mean(axis=0)
    s = np.sign(mu)
    ref = mu if center == "mean" else np.zeros(d)
    sums = []
    for i in range(len(h)):
        dists = sorted(np.linalg.norm(h[l] - h[i]) for l in range(len(h)) if l != i)
        sums.append(sum(dists[: m - c - 2]))
    lam = min(sums) / ((m - 2 * c - 1) * np.sqrt(d)) + max(
        np.linalg.norm(hi - ref) for hi in h) / np.sqrt(d)

    def krum_picks_byzantine(lam):
        rows = [ref - lam * s] * c + list(h)  # Byzantine slots first, as jbyz
        scores = []
        for i in range(len(rows)):
            dd = sorted(np.sum((rows[i] - rows[j]) ** 2) for j in range(len(rows)) if j != i)
            scores.append(sum(dd[: max(len(rows) - f - 2, 1)]))
        return int(np.argmin(scores)) < c

    t, done = 0, krum_picks_byzantine(lam)
    while not done and lam > threshold and t < max_halvings:
        lam, t = lam / 2, t + 1
        done = krum_picks_byzantine(lam)
    return ref - lam * s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--byzfl", type=pathlib.Path, required=True, help="ByzFL source checkout")
    ap.add_argument("--blades", type=pathlib.Path, required=True, help="Blades source checkout")
    args = ap.parse_args()

    import torch

    torch.manual_seed(0)
    cases = []

    # ---- ByzFL optimal attacks (namespace package: byzfl/__init__ imports the benchmark stack)
    pkg = types.ModuleType("byzfl")
    pkg.__path__ = [str(args.byzfl / "byzfl")]
    sys.modules["byzfl"] = pkg
    att = importlib.import_module("byzfl.attacks.attacks")
    ag = importlib.import_module("byzfl.aggregators.aggregators")
    pa = importlib.import_module("byzfl.aggregators.preaggregators")
    setups = [
        # (label, ByzFL agg, ByzFL pre list, jbyz aggregator, jbyz preaggregators)
        ("default", lambda f: ag.Average(), lambda f: [pa.Clipping()],
         {"name": "mean"}, [{"name": "clip", "tau": 2.0}]),
        ("trmean", lambda f: ag.TrMean(f=f), lambda f: [],
         {"name": "trimmed_mean"}, []),
        ("median_nnm", lambda f: ag.Median(), lambda f: [pa.NNM(f=f)],
         {"name": "median"}, [{"name": "nnm"}]),
        ("krum", lambda f: ag.Krum(f=f), lambda f: [],
         {"name": "krum", "neighbours": "code"}, []),
        ("mean_arc", lambda f: ag.Average(), lambda f: [pa.ARC(f=f)],
         {"name": "mean"}, [{"name": "arc"}]),
    ]
    for seed, (n_h, f, d) in enumerate([(5, 2, 4), (7, 2, 6), (8, 3, 5)]):
        h = sample(100 + seed, n_h, d)
        for label, agg, pre, jagg, jpre in setups:
            for cls, name in ((att.Optimal_ALittleIsEnough, "optimal_alie"),
                              (att.Optimal_InnerProductManipulation, "optimal_ipm")):
                a = cls(agg=agg(f), pre_agg_list=pre(f), f=f)
                out = np.asarray(a(h.copy()))
                cases.append(dict(attack=name, peer="byzfl", setup=label,
                                  call=f"{cls.__name__}({label}, f={f})", f=f, honest=h.tolist(),
                                  aggregator=jagg, preaggregators=jpre, out=out.tolist()))

    # ---- Blades: Fang et al. on trimmed mean / median (AdaptiveAdversary)
    adv = args.blades / "blades" / "adversaries"
    src = method_source(adv / "adaptive_adversary.py", "AdaptiveAdversary",
                        "_attack_median_and_trimmedmean")
    for seed, (n_h, d, offset) in enumerate([(6, 12, 0.0), (9, 20, 0.3), (4, 8, -0.2)]):
        h = sample(200 + seed, n_h, d, offset=offset)
        rng = np.random.default_rng(300 + seed)
        u = rng.random(d).astype(np.float32).astype(np.float64)
        ht = torch.tensor(h)
        dev = torch.sign(ht.mean(dim=0))
        mx, mn = ht.max(dim=0)[0], ht.min(dim=0)[0]
        masks = [(dev == -1) & (mx > 0), (dev == -1) & (mx < 0), (dev == 1) & (mn > 0),
                 (dev == 1) & (mn < 0)]
        ns = {"torch": TorchWithRecordedRandomness(torch, [u[m.numpy()] for m in masks])}
        exec(src, ns)
        me = types.SimpleNamespace(get_benign_updates=lambda alg, ht=ht: ht)
        out = ns["_attack_median_and_trimmedmean"](me, None).numpy()
        cases.append(dict(attack="fang_trim", peer="blades",
                          call="AdaptiveAdversary._attack_median_and_trimmedmean", honest=h.tolist(),
                          u=u.tolist(), out=out.tolist()))

    # ---- Blades: SignGuard
    src = method_source(adv / "signguard_adversary.py", "SignGuardAdversary", "_attack_sign_guard")
    for seed, (n_h, d) in enumerate([(5, 10), (8, 16)]):
        h = sample(400 + seed, n_h, d, offset=0.1)
        if seed == 1:
            h[:, 3] = 0.0  # a zero coordinate of the mean
        rng = np.random.default_rng(500 + seed)
        u = rng.random(d).astype(np.float32).astype(np.float64)
        perm = rng.permutation(d)
        ht = torch.tensor(h)
        mean = ht.mean(dim=0)
        pos, neg = int((mean > 0).sum()), int((mean < 0).sum())
        ns = {"torch": TorchWithRecordedRandomness(torch, [u[:pos], u[pos:pos + neg]], perm)}
        exec(src, ns)
        me = types.SimpleNamespace(get_benign_updates=lambda alg, ht=ht: ht)
        out = ns["_attack_sign_guard"](me, None).numpy()
        cases.append(dict(attack="signguard_attack", peer="blades",
                          call="SignGuardAdversary._attack_sign_guard", honest=h.tolist(),
                          u=u.tolist(), perm=perm.tolist(), out=out.tolist()))

    # ---- Blades: clipped clustering (chain attack, single linkage)
    src = method_source(adv / "attackclippedclustering_adversary.py",
                        "AttackclippedclusteringAdversary", "_chain_attack")
    from sklearn.cluster import AgglomerativeClustering

    for seed, (n_h, c, d, spread) in enumerate([(7, 3, 6, 0.5), (6, 2, 5, 1.5), (9, 4, 8, 0.8)]):
        rng = np.random.default_rng(600 + seed)
        base = rng.normal(size=d)
        h = (base + spread * rng.normal(size=(n_h, d))).astype(np.float32).astype(np.float64)
        ht = torch.tensor(h)
        results = [{"id": i, "update": None} for i in range(c)] + [
            {"id": c + i, "update": ht[i]} for i in range(n_h)]
        clients = {i: types.SimpleNamespace(is_malicious=i < c) for i in range(c + n_h)}
        alg = types.SimpleNamespace(
            local_results=results,
            client_manager=types.SimpleNamespace(get_client_by_id=lambda i: clients[i]))
        ns = {"torch": torch, "np": np, "inf": np.inf, "AgglomerativeClustering":
              AgglomerativeClustering, "CLIENT_UPDATE": "update", "CLIENT_ID": "id"}
        exec(src, ns)
        me = types.SimpleNamespace(get_benign_updates=lambda alg, ht=ht: ht)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # affinity= (renamed metric= in 1.2)
            ns["_chain_attack"](me, alg)
        out = np.stack([np.asarray(r["update"]) for r in results[:c]])
        cases.append(dict(attack="clipped_clustering_attack", peer="blades",
                          call="AttackclippedclusteringAdversary._chain_attack", honest=h.tolist(),
                          f=c, out=out.tolist()))

    # ---- Fang et al. on Krum (numpy transcription of the paper)
    for seed, (n_h, c, d, center) in enumerate([(7, 2, 5, "zero"), (9, 3, 10, "zero"),
                                                (7, 2, 5, "mean"), (12, 4, 6, "mean")]):
        h = sample(700 + seed, n_h, d, offset=0.4)
        out = np_fang_krum(h, n_h + c, c, c, center)
        cases.append(dict(attack="fang_krum", peer="fang_krum", call=f"np_fang_krum({center})",
                          honest=h.tolist(), f=c, center=center, out=out.tolist()))

    OUT.write_text(json.dumps({"peers": PEERS, "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
