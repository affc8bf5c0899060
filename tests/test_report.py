"""The course's tables: printed, and read back for the claims ledger."""

import pytest

from minilora.course.report import CLAIMS_HEADER, format_table, parse_table, print_claims


def test_round_trip_with_wrapped_cells():
    rows = [["NF4 is optimal", "equal-mass bins hold for N(0,1) data; not for the real weights' tails " * 2, "partly"],
            ["0.373 bits saved", "0.373", "holds"]]
    text = "some output above\n" + format_table(CLAIMS_HEADER, rows, wrap=30) + "\n\nand below\n"
    header, back = parse_table(text)
    assert header == list(CLAIMS_HEADER)
    assert [[" ".join(c.split()) for c in r] for r in back] == [[" ".join(c.split()) for c in r] for r in rows]


def test_columns_line_up():
    lines = format_table(["a", "long header"], [[1, 2], ["three", 4]]).splitlines()
    assert lines[0] == "a     | long header"
    assert lines[1] == "------+------------"
    assert lines[2] == "1     | 2"


def test_bad_rows_are_refused(capsys):
    with pytest.raises(ValueError, match="row has 1 cells"):
        format_table(["a", "b"], [["only one"]])
    with pytest.raises(ValueError, match="claim, measured, verdict"):
        print_claims([("claim", "measured")])
    with pytest.raises(ValueError, match="no table"):
        parse_table("just text\n")


def test_round_trip_with_rules_and_column_widths():
    rows = [["a claim that is long enough to wrap twice over", "measured 1.23 x", "holds"],
            ["short", "a long measurement that wraps onto a second line", "does not hold, as measured"]]
    text = format_table(CLAIMS_HEADER, rows, wrap=(20, 24, 12), rules=True)
    assert all(len(line) <= 20 + 24 + 12 + 6 for line in text.splitlines())
    header, back = parse_table(text)
    assert header == list(CLAIMS_HEADER)
    assert back == rows


def test_claims_table_takes_a_basis_column_for_every_row_or_none(capsys):
    from minilora.course.report import parse_table, print_claims

    print_claims([("a", "1", "holds", "measured"), ("b", "2", "fails", "derived")])
    header, rows = parse_table(capsys.readouterr().out)
    assert header == ["claim", "measured here", "verdict", "basis"] and rows[1] == ["b", "2", "fails", "derived"]
    with pytest.raises(ValueError, match="every claim a basis"):
        print_claims([("a", "1", "holds", "measured"), ("b", "2", "fails")])
    with pytest.raises(ValueError, match="basis must be one of"):
        print_claims([("a", "1", "holds", "guessed")])


def test_wrapped_claims_read_back_whole(capsys):
    from minilora.course.report import parse_table, print_claims

    long = "a claim long enough to wrap onto a second line of its column"
    print_claims([(long, "1", "holds", "measured"), ("b", "2", "fails", "derived")], wrap=20)
    rows = parse_table(capsys.readouterr().out)[1]
    assert [r[0] for r in rows] == [long, "b"]
