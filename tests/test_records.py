import json

import pytest

from wise_cl.records import EditDataError, bundled_path, read_irrelevant_prompts, read_requests, read_subjects


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


def test_hallucination_layout_has_no_rephrase():
    requests = read_requests("hallucination", limit=5)
    assert all(r.rephrases == () and r.ood_rephrase is None for r in requests)
    assert requests[0].subject == "carole gist"


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
