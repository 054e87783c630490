import json
import random

import pytest

from wise_cl.records import (
    EditDataError,
    bundled_path,
    read_irrelevant_prompts,
    read_negative_prompts,
    read_requests,
    read_subjects,
)


def test_zsre_layout_maps_fields():
    first = read_requests("zsre", limit=1)[0]
    assert first.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert first.target == "2006"
    assert first.rephrases == ("When was the IAAF Combined Events Challenge launched?",)
    assert first.locality_prompt.startswith("nq question: ")
    assert first.locality_answer == "The String"
    assert first.subject == "IAAF Combined Events Challenge"


def test_counterfact_layout_maps_fields():
    first = read_requests("counterfact", limit=2)[0]
    assert (first.prompt, first.target) == ("The mother tongue of Danielle Darrieux is", "English")
    assert first.rephrases == ("Where Danielle Darrieux is from, people speak the language of",)
    assert (first.locality_prompt, first.locality_answer) == ("Michel Rocard is a native speaker of", "French")


def test_temporal_layout_has_ood_rephrase():
    requests = read_requests("temporal")
    assert len(requests) == 75
    assert all(r.ood_rephrase for r in requests)
    assert requests[0].prompt == "Tesla, Inc.,"
    # the dev parts: other requests of the same layouts
    dev = read_requests("temporal_train")
    assert len(dev) == 75 and all(r.ood_rephrase for r in dev) and dev[0].prompt != requests[0].prompt
    assert dev[25].locality_answer == ""  # empty in the file: that request has no locality score
    assert len(read_requests("hallucination_train")) == 306


def test_hallucination_layout_has_no_rephrase():
    requests = read_requests("hallucination", limit=5)
    assert all(r.rephrases == () and r.ood_rephrase is None for r in requests)
    assert requests[0].subject == "carole gist"
    # 7 of its 600 records have an empty locality answer: they have no locality score, the stream still runs
    stream = read_requests("hallucination", limit=100)
    assert stream[86].locality_answer == "" and sum(not r.locality_answer for r in stream) == 2


def test_any_json_file_in_a_known_layout(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"src": "Q?", "alt": "A", "rephrase": "Q2?", "loc": "L", "loc_ans": "B"}]))
    (request,) = read_requests(path)
    assert (request.prompt, request.target, request.rephrases) == ("Q?", "A", ("Q2?",))


def test_irrelevant_prompts_bundled_lists():
    assert len(read_irrelevant_prompts("zsre")) == 1000
    assert len(read_irrelevant_prompts("temporal")) == 75
    with pytest.raises(EditDataError, match="needs 2000"):
        read_irrelevant_prompts("zsre", count=2000)


def test_bundled_swap_subjects_are_no_bundled_request_subject(tmp_path):
    subjects = read_subjects()
    assert len(subjects) == len(set(subjects)) == 1000
    for path in bundled_path("").glob("*/*.json"):
        records = json.loads(path.read_text())
        if isinstance(records, list) and isinstance(records[0], dict):
            assert not {r["subject"] for r in records} & set(subjects), path
    path = tmp_path / "subjects.json"
    path.write_text('["Kyoto", ""]')
    with pytest.raises(EditDataError, match="record 1"):
        read_subjects(path)


def test_bundled_negative_prompts_are_no_bundled_text():
    prompts = read_negative_prompts()
    assert len(prompts) == len(set(prompts)) == 2000
    for path in bundled_path("").glob("*/*.json"):
        records = json.loads(path.read_text())
        if isinstance(records, list) and isinstance(records[0], dict):
            texts = {str(value) for record in records for value in record.values()}
            assert not texts & set(prompts), path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{'src': 1}", "malformed JSON"),
        ('[{"src": "Q?", "alt": "A", "loc": "L"}]', "record 0, field 'loc_ans': missing field"),
        (
            '[{"src": "Q?", "alt": "A", "loc": "L", "loc_ans": "B"},'
            ' {"src": "Q?", "alt": " ", "loc": "L", "loc_ans": "B"}]',
            "record 1, field 'alt': empty text",
        ),
        ('[{"question": "Q?"}]', "unknown layout"),
        ("{}", "non-empty JSON list"),
        ('[{"src": "Q?", "alt": ["A", "B"], "loc": "L", "loc_ans": "B"}]', "record 0, field 'alt': expected text"),
        ('[{"src": "Q?", "alt": "A", "rephrase": " ", "loc": "L", "loc_ans": "B"}]', "field 'rephrase': empty text"),
        ('[{"src": "Q?", "alt": "A", "loc": "L", "loc_ans": "B"}, "text"]', "record 1: expected a JSON object"),
        ('{"src": "Q?"}\n{"src": ', "malformed JSON Lines \\(line 2"),
    ],
)
def test_bad_input_names_file_record_and_field(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(EditDataError, match=message) as error:
        read_requests(path)
    assert "bad.json" in str(error.value)


def test_missing_file_and_too_many_requests(tmp_path):
    with pytest.raises(EditDataError, match="file not found"):
        read_requests(tmp_path / "nothing.json")
    with pytest.raises(EditDataError, match="holds 75"):
        read_requests("temporal", limit=76)


CF = {"prompt": "P", "target_new": "T", "locality_prompt": "L", "locality_ground_truth": "G"}


def test_layout_follows_most_records_and_every_record_must_carry_it(tmp_path):
    path = tmp_path / "cf.json"
    records = [CF] + [CF | {"rephrase_prompt": f"R{i}"} for i in range(4)]  # record 0 lacks its rephrase
    path.write_text(json.dumps(records))
    with pytest.raises(EditDataError, match="record 0, field 'rephrase_prompt': missing field of the counterfact"):
        read_requests(path)
    assert [r.rephrases for r in read_requests(path, start=1)] == [(f"R{i}",) for i in range(4)]
    path.write_text(json.dumps([CF, CF, CF | {"rephrase_prompt": "R"}]))  # mostly hallucination layout
    assert [r.rephrases for r in read_requests(path)] == [(), (), ()]


def test_json_lines_bom_lists_of_rephrases_and_other_encodings(tmp_path):
    path = tmp_path / "edits.jsonl"
    lines = [CF | {"rephrase_prompt": ["R1", "R2"]}, CF | {"rephrase_prompt": "R3"}]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in lines).encode() + b"\n")
    assert [r.rephrases for r in read_requests(path)] == [("R1", "R2"), ("R3",)]
    path.write_bytes(json.dumps([CF | {"prompt": "Caf\u00e9"}], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(EditDataError, match="edits.jsonl: not UTF-8 text"):
        read_requests(path)


def _mutations(rng: random.Random) -> list:
    """A list of records in one of the layouts, some of them broken at random."""
    junk = [None, 0, 1.5, True, "", " ", [], ["x", 2], {"a": 1}, "é\u2028\x00", "x" * 300]
    layout = rng.choice([dict(CF), {"src": "Q", "alt": "A", "loc": "L", "loc_ans": "B", "rephrase": "R"}])
    records = []
    for _ in range(rng.randint(1, 6)):
        record = dict(layout)
        for _ in range(rng.randint(0, 3)):
            key = rng.choice([*record, "subject", "ood_rephrase", "rephrase_prompt"])
            if rng.random() < 0.3:
                record.pop(key, None)
            else:
                record[key] = rng.choice(junk)
        records.append(record if rng.random() < 0.9 else rng.choice(junk))
    return records


def test_fuzzed_records_are_read_or_refused_with_an_edit_data_error(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "fuzz.json"
    outcomes = {"read": 0, "refused": 0}
    for case in range(400):
        text = json.dumps(_mutations(rng), ensure_ascii=rng.random() < 0.5)
        if case % 7 == 0:  # cut or corrupt the file itself
            cut = rng.randint(0, len(text))
            text = text[:cut] + rng.choice(["", "}", "\n{", "\ufeff", "\x00"])
        path.write_bytes(text.encode("utf-8") if case % 11 else text.encode("utf-16"))
        try:
            requests = read_requests(path)
        except EditDataError as error:
            assert str(error).startswith(str(path))
            outcomes["refused"] += 1
        else:
            assert requests and all(r.prompt.strip() and r.target.strip() for r in requests)
            outcomes["read"] += 1
    assert outcomes["read"] > 20 and outcomes["refused"] > 100
