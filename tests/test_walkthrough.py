"""The classroom walkthrough, run: docs/WALKTHROUGH.md shows what its commands print.

The first test runs every command of docs/walkthrough/WALKTHROUGH.template.md, in order, from a
clean state of its own (its own broker, ports and directories; about four minutes on two cores)
and compares the result with the committed doc, timing-dependent figures masked. The others try
the runner and the check on small templates of shell commands, which need no Kafka.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from periscope import walkthrough
from periscope.walkthrough import WalkthroughError


@pytest.mark.kafka
def test_the_walkthrough_prints_what_the_doc_shows(tmp_path):
    result = walkthrough.check(log=lambda line: print(line, flush=True), rendered_to=tmp_path / "WALKTHROUGH.md")
    assert result.ok, result.report


PROMPT_LOOP = ("printf 'sql> '; while read -r line; do [ \"$line\" = quit ] && exit 0; "
               "echo \"$line: ${#line} characters\"; printf 'sql> '; done")

TEMPLATE = f"""<!--template a note for editors only -->
# A tour

```run
#| capture: trips = published (\\d+) trips
echo "published 3 trips to $PERISCOPE_DATA_DIR/views in 1.25 s"
```

Then {{{{trips}}}} trips.

```start 5
for i in 1 2 3; do echo "tick $i"; done; echo "offset 41 ready"; sleep 60
```

```show 5
#| wait-for: ready
#| hide: tick 2
#| volatile: offset \\d+
```

```ctrl-c 5
```

```start 4
{PROMPT_LOOP}
```

```type 4
SELECT 1
quit
```

```await 4
```

The end: offset 7.
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "template.md"
    path.write_text(text)
    return path


def render(tmp_path: Path, text: str) -> str:
    return walkthrough.render(write(tmp_path, text), log=lambda line: None, jars=False).text


def check(tmp_path: Path, text: str, doc: str) -> walkthrough.CheckResult:
    (tmp_path / "doc.md").write_text(doc)
    return walkthrough.check(write(tmp_path, text), tmp_path / "doc.md", log=lambda line: None,
                             rendered_to=tmp_path / "rendered.md", jars=False)


def test_each_command_is_shown_with_its_output_as_a_reader_sees_it(tmp_path):
    doc = render(tmp_path, TEMPLATE)
    assert doc.startswith(walkthrough.HEADER) and "note for editors" not in doc
    assert ("```bash\necho \"published 3 trips to $PERISCOPE_DATA_DIR/views in 1.25 s\"\n```\n\n"
            "```\npublished 3 trips to data/views in 1.25 s\n```\n") in doc, "the temporary dir is data/ again"
    assert "Then 3 trips." in doc
    assert "```\ntick 1\ntick 3\noffset 41 ready\n```" in doc
    assert "```\nsql> SELECT 1\nSELECT 1: 8 characters\nsql> quit\n```" in doc
    assert "\n\n\n" not in doc, "blocks that show nothing (ctrl-c, await) leave no gap"


def test_the_check_masks_timing_but_no_other_figure(tmp_path):
    doc = render(tmp_path, TEMPLATE)
    assert check(tmp_path, TEMPLATE, doc).ok
    assert check(tmp_path, TEMPLATE, doc.replace("in 1.25 s", "in 10.5 s")).ok, "a duration varies"
    other_offset = doc.replace("\noffset 41 ready", "\noffset 9 ready")
    assert check(tmp_path, TEMPLATE, other_offset).ok, "volatile in its own block"

    changed = check(tmp_path, TEMPLATE, doc.replace("published 3 trips", "published 4 trips"))
    assert not changed.ok
    assert "-published 4 trips to data/views in <duration>" in changed.report
    assert "+published 3 trips to data/views in <duration>" in changed.report
    elsewhere = check(tmp_path, TEMPLATE, doc.replace("The end: offset 7.", "The end: offset 8."))
    assert not elsewhere.ok, "a block's volatile figures are masked in that block only"


def test_a_failing_command_is_named_with_the_end_of_its_output(tmp_path):
    result = check(tmp_path, "```run\necho half-way; exit 3\n```\n", "")
    assert not result.ok
    assert "`echo half-way; exit 3` exited with 3" in result.report and "half-way" in result.report


def test_a_claim_the_output_contradicts_fails_the_walkthrough(tmp_path):
    template = "```run\n#| expect: 0 twice\necho 'dead letters: 53, 1 twice'\n```\n"
    with pytest.raises(WalkthroughError, match="does not match '0 twice'"):
        render(tmp_path, template)


def test_a_background_command_that_ends_early_is_reported(tmp_path):
    template = "```start 4\necho starting; exit 1\n```\n\n```show 4\n#| wait-for: ready\n```\n"
    with pytest.raises(WalkthroughError, match="ended without a line matching 'ready'"):
        render(tmp_path, template)


@pytest.mark.parametrize("template, message", [
    ("```run\n#| wait-for: x\necho\n```\n", "run has no option 'wait-for'"),
    ("```show\n```\n", "show names one terminal"),
    ("```run\necho\n", "never closed"),
    ("```show 4\n```\n", "nothing was started in terminal 4"),
])
def test_template_mistakes_are_explained(tmp_path, template, message):
    with pytest.raises(WalkthroughError, match=message):
        render(tmp_path, template)
