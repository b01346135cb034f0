"""The documents of the ``scaleformer_demo`` lm-eval task (read by its YAML's ``custom_dataset``)."""

from __future__ import annotations

from typing import Any

DOCUMENTS = [
    {"question": "def add(a, b):\n    return a", "choices": [" + b", " - b", " * b"], "answer": 0},
    {"question": "for i in", "choices": [" range(10):", " print(10):", " return(10):"], "answer": 0},
    {"question": "import", "choices": [" os", " the", " ="], "answer": 0},
    {"question": "if x is", "choices": [" None:", " def:", " import:"], "answer": 0},
    {"question": "The for statement is used to iterate over the elements of a", "choices": [" sequence", " colour",
                                                                                            " planet"], "answer": 0},
    {"question": "A function is defined with the keyword", "choices": [" def", " func", " lambda:"], "answer": 0},
    {"question": "class Point:\n    def __init__(self", "choices": [", x, y):", ") x, y:", "(x, y)"], "answer": 0},
    {"question": "try:\n    pass\nexcept", "choices": [" ValueError:", " ValueError", " finally"], "answer": 0},
    {"question": "The value of True and False is", "choices": [" False", " True", " None"], "answer": 0},
    {"question": "with open(path) as", "choices": [" f:", " f", " (f)"], "answer": 0},
    {"question": "A list is written between square", "choices": [" brackets", " braces", " quotes"], "answer": 0},
    {"question": "while True:\n    break\nelse:\n   ", "choices": [" pass", " def", " import"], "answer": 0},
    {"question": "The built-in function len() returns the", "choices": [" length", " colour", " weather"], "answer": 0},
    {"question": "return", "choices": [" result", " def", " class"], "answer": 0},
    {"question": "An exception is raised with the", "choices": [" raise", " throw", " panic"], "answer": 0},
    {"question": "x = [1, 2, 3]\nprint(x[", "choices": ["0])", "x])", "])"], "answer": 0},
    {"question": "Strings are immutable sequences of Unicode", "choices": [" code points", " pixels", " files"],
     "answer": 0},
    {"question": "lambda x:", "choices": [" x + 1", " def x", " import x"], "answer": 0},
    {"question": "A dictionary maps keys to", "choices": [" values", " loops", " modules"], "answer": 0},
    {"question": "The statement that does nothing is", "choices": [" pass", " stop", " halt"], "answer": 0},
]


def documents(**metadata: Any) -> dict[str, Any]:
    """The task's one split (lm-eval passes the run's metadata; none of it changes the documents)."""
    import datasets

    return {"test": datasets.Dataset.from_list(DOCUMENTS)}
