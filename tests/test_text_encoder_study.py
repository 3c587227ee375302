"""Text-encoder study (paper Tables 2 and 3): CheXpert@k, impressions, sampling, encoders, the CLI."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
from datamodules.mimic_cxr import CHEXPERT_CLASSES
from metrics.chexpert_at_k import (CosineSimilarity, TokenIoUSimilarity, chexpert_at_k, class_matrices, is_degenerate,
                                      neighbour_weights)
from datamodules.report_corpus import ReportCorpusError
from evaluation.text_encoder_study import (REGISTRY, TextEncoderStudyError, load_corpus, load_study_encoder,
                                           parse_encoders, sample_per_class)

CLASSES = ("a", "b")


def matrix_source(sim):
    sim = torch.as_tensor(sim, dtype=torch.float64)
    return lambda start, stop: sim[start:stop]


# ---------------------------------------------------------------------------------------------- the metric
def test_hand_computed_scores_exclude_the_report_itself():
    # reports 0,1 are class a; 2,3 class b. Each report is most similar to itself (diagonal 1.0).
    sim = [[1.0, 0.9, 0.8, 0.1],
           [0.9, 1.0, 0.2, 0.7],
           [0.8, 0.2, 1.0, 0.3],
           [0.1, 0.7, 0.3, 1.0]]
    member, scored = class_matrices(torch.tensor([0, 0, 1, 1]), None, 2, "paper")
    # k=1 neighbours: 0->1 (a, hit), 1->0 (hit), 2->0 (miss), 3->1 (miss)
    r = chexpert_at_k(matrix_source(sim), 4, member, scored, 1, CLASSES)
    assert r.per_class == {"a": 1.0, "b": 0.0} and r.macro == 0.5 and r.counts == {"a": 2, "b": 2}
    # k=2: 0->{1,2} 1/2; 1->{0,3} 1/2; 2->{0,3} 1/2; 3->{1,2} 1/2
    r = chexpert_at_k(matrix_source(sim), 4, member, scored, 2, CLASSES)
    assert r.per_class == {"a": 0.5, "b": 0.5}
    assert torch.equal(r.rates[:, 0].isnan(), torch.tensor([False, False, True, True]))


def test_tied_neighbours_share_the_remaining_places():
    # strictly larger values always count; the one place left at the k-th value is shared by the three tied columns
    sim = torch.tensor([[0.0, 0.5, 0.5, 0.9, 0.5]])
    assert torch.allclose(neighbour_weights(sim, 0, 2), torch.tensor([[0.0, 1 / 3, 1 / 3, 1.0, 1 / 3]], dtype=torch.float64))
    # rows of a later chunk exclude their own column, not column r
    assert neighbour_weights(torch.ones(2, 4), 2, 3).tolist() == [[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]
    # the credit is the expectation under random tie-breaking: 4000 random orders of coarse similarities
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 3, (12, 12)) / 2.0
    coarse = np.triu(coarse, 1) + np.triu(coarse, 1).T
    drawn = np.arange(12) % 3
    member, scored = class_matrices(torch.from_numpy(drawn), None, 3, "paper")
    got = chexpert_at_k(matrix_source(coarse), 12, member, scored, 3, "abc").rates[torch.arange(12), drawn].numpy()
    hits = np.zeros(12)
    for _ in range(4000):
        key = rng.random(12)
        for i in range(12):
            others = [j for j in range(12) if j != i]
            top = sorted(others, key=lambda j: (-coarse[i, j], key[j]))[:3]
            hits[i] += np.mean(drawn[top] == drawn[i])
    np.testing.assert_allclose(got, hits / 4000, atol=0.03)


def test_coarse_similarities_without_class_signal_score_chance_in_any_report_order():
    # issue 29: bag-of-words IoU of impressions drawn regardless of class ties nearly every neighbour. With ties to the
    # lowest index (the sample is sorted by class) class 0 scored 0.958 and the table followed column order.
    phrases = ["No acute cardiopulmonary process.", "No acute intrathoracic abnormality.", "Normal chest radiograph.",
               "Stable appearance of the chest."]
    rng = np.random.default_rng(0)
    texts = [phrases[i] for i in rng.integers(0, len(phrases), 700)]
    drawn = torch.arange(14).repeat_interleave(50)
    member, scored = class_matrices(drawn, None, 14, "paper")
    classes = [str(i) for i in range(14)]
    r = chexpert_at_k(TokenIoUSimilarity(texts), 700, member, scored, 10, classes)
    chance = 49 / 699
    assert max(r.per_class.values()) < 0.15 and r.macro == pytest.approx(chance, abs=0.01), r.per_class
    order = rng.permutation(700)  # the same reports in another order: the same scores
    m2, s2 = class_matrices(drawn[order], None, 14, "paper")
    shuffled = chexpert_at_k(TokenIoUSimilarity([texts[i] for i in order]), 700, m2, s2, 10, classes)
    assert shuffled.per_class == pytest.approx(r.per_class, abs=1e-12)


def test_identical_embeddings_are_flagged_and_explain_the_papers_clip_cls_score():
    # 14 classes x 50 reports, every embedding the same: every other report ties, so each gets credit 10 / 699 and a
    # report's score is the share of its own class among the others, 49 / 699 = 7.0 % (chance): the paper's 7.0 for
    # CLIP "CLS" is this, no measurement. (Ties to the lowest index gave class 0 100 %, the others 0, macro 1/14.)
    emb = torch.ones(700, 8)
    drawn = torch.arange(14).repeat_interleave(50)
    member, scored = class_matrices(drawn, None, 14, "paper")
    r = chexpert_at_k(CosineSimilarity(emb), 700, member, scored, 10, [str(i) for i in range(14)])
    assert r.macro == pytest.approx(49 / 699) and max(r.per_class.values()) == pytest.approx(49 / 699)
    assert is_degenerate(emb) and is_degenerate(emb + 1e-9 * torch.randn(700, 8))
    assert not is_degenerate(torch.randn(700, 8))


def test_multilabel_mode_counts_neighbours_positive_for_the_class():
    sim = [[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]]
    positives = torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    member, scored = class_matrices(torch.tensor([0, 1, 1]), positives, 2, "multilabel")
    r = chexpert_at_k(matrix_source(sim), 3, member, scored, 1, CLASSES)
    # 0 (drawn a) -> 1, positive for a: hit; 1 (drawn b) -> 0, not b: miss; 2 (drawn b) -> 1, positive for b: hit
    assert r.per_class == {"a": 1.0, "b": 0.5}
    # the same neighbours in paper mode: 0 -> 1 drawn b: miss
    member, scored = class_matrices(torch.tensor([0, 1, 1]), positives, 2, "paper")
    assert chexpert_at_k(matrix_source(sim), 3, member, scored, 1, CLASSES).per_class == {"a": 0.0, "b": 0.5}
    # a whole corpus: every report scored for each of its positive classes
    member, scored = class_matrices(None, positives, 2, "multilabel")
    r = chexpert_at_k(matrix_source(sim), 3, member, scored, 1, CLASSES)
    assert r.counts == {"a": 2, "b": 2} and r.per_class == {"a": 1.0, "b": 0.5}
    with pytest.raises(ValueError, match="multilabel"):
        class_matrices(None, positives, 2, "paper")


def test_chunked_scores_match_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(97, 6, generator=g)
    emb[40] = emb[3]  # exact duplicates create ties
    drawn = torch.randint(0, 5, (97,), generator=g)
    member, scored = class_matrices(drawn, None, 5, "paper")
    k = 7
    x = torch.nn.functional.normalize(emb.double(), dim=1).numpy()
    sims = x @ x.T
    ref = np.zeros(97)
    for i in range(97):  # the k-th largest value; the places left at it are shared by every report tied there
        others = np.array([j for j in range(97) if j != i])
        s_i = np.round(sims[i, others], 12)
        kth = np.sort(s_i)[::-1][k - 1]
        same = (drawn[others] == drawn[i]).numpy()
        above, tied = s_i > kth, s_i == kth
        ref[i] = (same[above].sum() + (k - above.sum()) * same[tied].mean()) / k
    small = chexpert_at_k(CosineSimilarity(emb), 97, member, scored, k, list("abcde"), max_chunk_elements=97)  # 1 row per chunk
    whole = chexpert_at_k(CosineSimilarity(emb), 97, member, scored, k, list("abcde"))
    got = small.rates[torch.arange(97), drawn].numpy()
    np.testing.assert_allclose(got, ref)
    np.testing.assert_allclose(whole.rates.nan_to_num(-1).numpy(), small.rates.nan_to_num(-1).numpy())


def test_k_must_leave_room_for_neighbours():
    member, scored = class_matrices(torch.tensor([0, 1, 1]), None, 2, "paper")
    with pytest.raises(ValueError, match=r"k=3 must be smaller than the number of reports \(3\)"):
        chexpert_at_k(matrix_source(torch.eye(3)), 3, member, scored, 3, CLASSES)


def test_bag_of_words_similarity_is_intersection_over_union():
    sim = TokenIoUSimilarity(["Small left pleural effusion.", "small RIGHT pleural effusion", "", "___"])(0, 4)
    assert sim[0, 1].item() == pytest.approx(3 / 5)  # {small, pleural, effusion} / {small, left, right, pleural, effusion}
    assert sim[0, 0].item() == 1.0 and sim[2, 3].item() == 0.0 and sim[0, 2].item() == 0.0


# ---------------------------------------------------------------------------------------------- report fixtures
TITLE = " " * 33 + "FINAL REPORT"
PHRASES = {
    "Atelectasis": ["Bibasilar atelectasis.", "Mild left basilar atelectasis.", "Linear atelectasis at the right base."],
    "Cardiomegaly": ["Moderate cardiomegaly.", "The heart is enlarged.", "Stable mild cardiomegaly."],
    "Edema": ["Mild pulmonary edema.", "Moderate interstitial edema.", "Pulmonary vascular congestion with edema."],
    "No Finding": ["No acute cardiopulmonary process.", "No acute intrathoracic abnormality.", "Normal chest radiograph."],
    "Pleural Effusion": ["Small left pleural effusion.", "Moderate bilateral pleural effusions.", "Large right pleural effusion."],
}


def report_text(impression: str, addendum: bool = False, only_findings: bool = False, nothing: bool = False) -> str:
    lines = []
    if addendum:
        lines += [" ADDENDUM:  ", " The findings were discussed with Dr. ___ at ___.", " ", " " + "_" * 78]
    lines += [TITLE, " EXAMINATION:  CHEST (PA AND LAT)", " ", " INDICATION:  ___ year old woman with dyspnea", " "]
    if nothing:
        return "\n".join(lines[:2]) + "\n"
    lines += [" COMPARISON:  ___", " ", " FINDINGS: ", " ", f" Lungs and pleura as follows.  {impression}"]
    if not only_findings:
        lines += [" ", " IMPRESSION: ", " ", f" {impression}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def report_root(tmp_path_factory) -> Path:
    """6 reports per class for 5 classes in the real layout and format, plus labels; a few odd cases."""
    root = tmp_path_factory.mktemp("reports")
    rows = []
    study = 50000000
    for ci, (cls, phrases) in enumerate(PHRASES.items()):
        for i in range(6):
            study += 1
            subject = 10000000 + study % 1000
            text = report_text(phrases[i % 3], addendum=(ci == 0 and i == 0), only_findings=(ci == 1 and i == 0))
            path = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            labels = {c: "" for c in CHEXPERT_CLASSES}
            labels[cls] = "1.0"
            if cls == "Edema" and i == 5:
                labels[cls] = "-1.0"  # uncertain
            if cls == "Pleural Effusion" and i < 2:
                labels["Atelectasis"] = "1.0"  # also positive for another class
            rows.append({"subject_id": subject, "study_id": study, **labels})
    odd = root / "files" / "p10" / "p10000999"
    odd.mkdir(parents=True)
    (odd / "s59999998.txt").write_text(report_text("", nothing=True))  # no usable section
    rows.append({"subject_id": 10000999, "study_id": 59999998, **{c: "" for c in CHEXPERT_CLASSES}})
    (odd / "s59999997.txt").write_text(report_text("Small left pleural effusion."))  # no label row
    rows.append({"subject_id": 10000998, "study_id": 59999996, **{c: "" for c in CHEXPERT_CLASSES}})  # no report
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as fh:
        pd.DataFrame(rows, columns=["subject_id", "study_id", *CHEXPERT_CLASSES]).to_csv(fh, index=False)
    return root


def test_impressions_from_real_format_reports(report_root):
    corpus = load_corpus(report_root, report_root / "mimic-cxr-2.0.0-chexpert.csv.gz", progress=False)
    t = corpus.table.set_index("study_id")
    assert t.loc[50000001, "text"] == "Bibasilar atelectasis."  # the addendum above the title is not the impression
    assert t.loc[50000007, "section"] == "findings"  # no IMPRESSION: findings instead
    assert t.loc[50000007, "text"].endswith("Moderate cardiomegaly.")
    assert corpus.sections_used == {"impression": 29, "findings": 1, "last_paragraph": 0}
    assert corpus.skipped["no_usable_section"] == 1
    assert corpus.skipped["reports_without_labels"] == 1 and corpus.skipped["labels_without_report"] == 1
    excluded = load_corpus(report_root, report_root / "mimic-cxr-2.0.0-chexpert.csv.gz", "exclude", progress=False)
    assert excluded.skipped["uncertain_excluded"] == 1 and len(excluded.table) == 29


def test_class_balanced_sample(report_root):
    corpus = load_corpus(report_root, report_root / "mimic-cxr-2.0.0-chexpert.csv.gz", progress=False)
    classes = list(PHRASES)
    s = sample_per_class(corpus, 4, seed=1, classes=classes)
    assert s["class"].value_counts().to_dict() == {c: 4 for c in classes}
    assert s["study_id"].is_unique  # a report is drawn for one class only
    assert list(s["class"]) == sorted(s["class"], key=classes.index)  # ordered by class
    for _, row in s.iterrows():
        assert row[row["class"]] == 1.0  # each report is positive for the class it carries
    assert s.equals(sample_per_class(corpus, 4, seed=1, classes=classes))
    assert not s["study_id"].equals(sample_per_class(corpus, 4, seed=2, classes=classes)["study_id"])
    # Edema has 5 definite positives (one is uncertain); Atelectasis 8 (6 + 2 from effusion reports)
    with pytest.raises(ReportCorpusError, match=r"'Edema': 5.*--allow_short_classes"):
        sample_per_class(corpus, 6, classes=classes)
    assert (sample_per_class(corpus, 6, classes=classes, uncertain="positive")["class"] == "Edema").sum() == 6
    short = sample_per_class(corpus, 6, classes=classes, allow_short_classes=True)
    assert (short["class"] == "Edema").sum() == 5


# ---------------------------------------------------------------------------------------------- encoders
def test_extractions_of_bert_cxr_bert_and_clip():
    texts = ["Small left pleural effusion.", "No acute cardiopulmonary process.", "Moderate cardiomegaly and edema."]
    bert = load_study_encoder(parse_encoders(["tiny-bert"])[0])
    emb, truncated = bert.embed(texts, progress=False)
    assert emb["specific"] is None and truncated == 0
    assert {k: v.shape for k, v in emb.items() if v is not None} == {"cls": (3, 32), "mean": (3, 32), "pooler": (3, 32)}
    # batching and length sorting do not change a text's embedding
    one_by_one, _ = bert.embed(texts, batch_size=1, progress=False)
    for k in ("cls", "mean", "pooler"):
        torch.testing.assert_close(one_by_one[k], emb[k], atol=1e-5, rtol=1e-5)

    cxr = load_study_encoder(parse_encoders(["tiny-cxr-bert"])[0])
    emb, _ = cxr.embed(texts, progress=False)
    assert emb["pooler"] is None and emb["specific"].shape == (3, 16)
    torch.testing.assert_close(emb["specific"].norm(dim=1), torch.ones(3))
    assert "no pooler" in cxr.unavailable["pooler"]

    clip = load_study_encoder(parse_encoders(["tiny-random"])[0])
    emb, _ = clip.embed(texts, progress=False)
    assert emb["specific"] is None and is_degenerate(emb["cls"]) and not is_degenerate(emb["pooler"])
    tok = clip.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        states = clip.model(input_ids=tok.input_ids).last_hidden_state  # after final_layer_norm
    eos = (tok.input_ids == clip.tokenizer.eos_token_id).int().argmax(1)  # first end-of-text token
    torch.testing.assert_close(emb["pooler"], states[torch.arange(3), eos], atol=1e-5, rtol=1e-5)


def test_masked_lm_checkpoint_has_no_pooler(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from synthetic.presets import load_tiny_bert_tokenizer, tiny_bert_config

    tokenizer = load_tiny_bert_tokenizer()
    BertForMaskedLM(BertConfig(**tiny_bert_config(len(tokenizer)))).save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    enc = load_study_encoder(parse_encoders([f"radbert={tmp_path / 'mlm'}"])[0])
    assert enc.entry.name == "RadBERT" and enc.extractions == ("cls", "mean")
    assert "no pooler weights" in enc.unavailable["pooler"]


def test_registry_holds_the_papers_seven():
    assert [e.name for e in REGISTRY.values()] == ["PubMedBERT", "ClinicalBERT", "SapBERT", "RadBERT", "CXRBERTgeneral",
                                                   "CXRBERTspecialized", "ClipTextEncoder"]
    assert REGISTRY["cxr-bert-specialized"].source == "microsoft/BiomedVLP-CXR-BERT-specialized"


def test_unloadable_model_says_how_to_provide_it(tmp_path):
    with pytest.raises(TextEncoderStudyError, match=r"hf download StanfordAIMI/RadBERT.*radbert=<folder>"):
        load_study_encoder(REGISTRY["radbert"], local_files_only=True)
    with pytest.raises(TextEncoderStudyError, match="no such folder"):
        load_study_encoder(parse_encoders([f"sapbert={tmp_path / 'missing'}"])[0])
    with pytest.raises(TextEncoderStudyError, match="not a registered encoder"):
        parse_encoders(["gpt5"])


# ---------------------------------------------------------------------------------------------- the command
def test_command_writes_tables_2_and_3(report_root, tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    from synthetic.presets import load_tiny_bert_tokenizer, tiny_bert_config

    tokenizer = load_tiny_bert_tokenizer()
    BertForMaskedLM(BertConfig(**tiny_bert_config(len(tokenizer)))).save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    out = tmp_path / "out"
    classes = list(PHRASES)
    code = evaluate.main(["text-encoders", "--reports", str(report_root / "files"),
                          "--labels", str(report_root / "mimic-cxr-2.0.0-chexpert.csv.gz"), "--out", str(out),
                          "--encoders", "tiny-bert", "tiny-cxr-bert", "tiny-random", f"radbert={tmp_path / 'mlm'}",
                          "--classes", *classes, "--n_per_class", "5", "--k", "4", "--no_progress"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "1 without a usable section" in printed and "Table 2" in printed

    t2 = pd.read_csv(out / "table2.csv", index_col=0, keep_default_na=False)
    assert list(t2.index) == ["tiny-bert", "tiny-cxr-bert", "tiny-random", "RadBERT"]
    assert list(t2.columns) == ["CLS hidden state", "Mean hidden states", "Pooler output", "Model specific"]
    assert t2.loc["tiny-random", "CLS hidden state"] == "degenerate"
    assert t2.loc["RadBERT", "Pooler output"] == "None" and t2.loc["tiny-bert", "Model specific"] == "None"
    assert t2.loc["tiny-cxr-bert", "Pooler output"] == "None" and float(t2.loc["tiny-cxr-bert", "Model specific"]) >= 0

    t3 = pd.read_csv(out / "table3.csv", index_col=0)
    assert list(t3.index) == [c for c in CHEXPERT_CLASSES if c in classes] + ["Macro"]
    assert list(t3.columns) == ["Base", "tiny-bert", "tiny-cxr-bert", "tiny-random", "Rad."]
    assert ((t3 >= 0) & (t3 <= 100)).all().all()
    # each Table 3 column is its model's best Table 2 cell; the macro row is the mean of the classes
    assert t3.loc["Macro", "tiny-bert"] == pytest.approx(max(float(v) for v in t2.loc["tiny-bert"] if v not in ("None", "degenerate")), abs=0.06)
    np.testing.assert_allclose(t3.drop(index="Macro").mean(), t3.loc["Macro"], atol=0.01)
    # the bag-of-words baseline finds the templated impressions of a class
    assert t3.loc["Macro", "Base"] > 60

    sample = pd.read_csv(out / "sample.csv")
    assert len(sample) == 25 and sample["class"].value_counts().to_dict() == {c: 5 for c in classes}
    assert list(sample.columns) == ["subject_id", "study_id", "class", "section"]  # ids only, no report text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"]["no_usable_section"] == 1 and summary["reports_in_study"] == 25
    assert summary["encoders"]["RadBERT"]["unavailable"]["pooler"].startswith("extraction 'pooler'")
    md = (out / "results.md").read_text()
    assert "| Abnormality | Base |" in md and "degenerate" in md and (out / "table3_heatmap.png").stat().st_size > 10_000


def run_cli(*args) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = evaluate.main(["text-encoders", *args, "--no_progress", "--encoders", "tiny-bert"])
    return code, err.getvalue()


def test_bad_inputs_get_one_clear_error(report_root, tmp_path):
    labels = str(report_root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    code, err = run_cli("--reports", str(tmp_path / "empty"), "--labels", labels, "--out", out)
    assert code == 2 and re.search(r"empty: no report files.*pXX/pSUBJECT/sSTUDY.txt", err)

    bad = tmp_path / "labels.csv"
    pd.read_csv(labels).drop(columns=["Edema"]).to_csv(bad, index=False)
    code, err = run_cli("--reports", str(report_root), "--labels", str(bad), "--out", out)
    assert code == 2 and "labels.csv: missing column(s) ['Edema']" in err

    common = ["--reports", str(report_root), "--labels", labels, "--out", out, "--classes", *PHRASES]
    code, err = run_cli(*common, "--n_per_class", "2", "--k", "10")
    assert code == 2 and "--k 10: the study has only 10 reports" in err
    code, err = run_cli(*common, "--n_per_class", "7")
    assert code == 2 and "'Edema': 5" in err and "'No Finding': 6" in err
    code, err = run_cli(*common, "--n_per_class", "0")
    assert code == 2 and "--mode multilabel" in err
    code, err = run_cli("--reports", str(report_root), "--out", out)
    assert code == 2 and "--labels" in err


def test_clip_from_a_diffusers_pipeline_folder(tmp_path):
    from models.stable_diffusion import load_text_encoder

    tokenizer, text_encoder = load_text_encoder("tiny-random")
    folder = tmp_path / "sd"
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text("{}")
    enc = load_study_encoder(parse_encoders([f"clip={folder}"])[0], local_files_only=True)
    assert enc.kind == "clip" and enc.entry.name == "ClipTextEncoder" and enc.max_length == 77
    assert enc.extractions == ("cls", "mean", "pooler")
    texts = ["Small left pleural effusion.", "Moderate cardiomegaly."]
    got, _ = enc.embed(texts, progress=False)
    want, _ = load_study_encoder(parse_encoders(["tiny-random"])[0]).embed(texts, progress=False)
    torch.testing.assert_close(got["pooler"], want["pooler"])
