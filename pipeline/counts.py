"""A run's work in its two units, converted in one place.

Input rows are what is read, planned and resumed: todo ranges, --limit, shards, the progress
bar. Answers are output rows in long form: what merge produces, the summary line, an
interrupted run's message. Without a question list each row is a (passage, question) pair and
gives one answer; with one (--questions) each row gives one answer per question.
"""

from __future__ import annotations

from dataclasses import dataclass

from .wording import plural


@dataclass(frozen=True)
class Count:
    """An amount of work: input rows, and the answers they give."""

    rows: int  # input rows
    questions_per_row: int = 0  # 0: the rows are pairs, one answer each

    @classmethod
    def of_answers(cls, answers: int, questions_per_row: int) -> "Count":
        """The rows that gave `answers` (answers of whole rows only)."""
        rows, rest = divmod(answers, questions_per_row or 1)
        if rest:
            raise ValueError(f"{answers} answers are not whole rows of {questions_per_row} questions")
        return cls(rows, questions_per_row)

    @property
    def answers(self) -> int:
        return self.rows * (self.questions_per_row or 1)

    @property
    def unit(self) -> str:
        """What an output row is: an answer with a question list, else a row of the input."""
        return "answer" if self.questions_per_row else "row"

    def __add__(self, other: "Count") -> "Count":
        if other.questions_per_row != self.questions_per_row:
            raise ValueError("counts of runs with different question lists cannot be added")
        return Count(self.rows + other.rows, self.questions_per_row)

    def __str__(self) -> str:
        """'3 rows', or with a question list '30 answers'."""
        return plural(self.answers, self.unit)
