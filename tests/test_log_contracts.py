"""A test reads a launched server's log only where the log line is what it tests (the contract: what an
operator reads, such as the one-line refusal, the access line's fields, a documented start-up line, or
what must never be logged); every other fact goes through /info, /health, /metrics, the response or the
process table. launched_server.py's `LaunchedServer.contract_log(contract)` is the one way to read the log, and it
takes the reason; `log_tail()` is for failure messages only."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _string_constants(tree: ast.AST) -> dict[str, str]:
    """Names bound to a string literal anywhere in the module (a contract given through a variable)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            names.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return names


def _in_failure_messages(tree: ast.AST) -> set[int]:
    """Ids of every node inside an assert's message or a raise."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        part = node.msg if isinstance(node, ast.Assert) else node if isinstance(node, ast.Raise) else None
        if part is not None:
            inside.update(id(child) for child in ast.walk(part))
    return inside


def log_read_problems(source: str, name: str) -> list[str]:
    """Each way `source` (a test module called `name`) reads a server's log without naming the contract."""
    tree = ast.parse(source)
    constants = _string_constants(tree)
    messages = _in_failure_messages(tree)
    problems = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and node.attr == "log_path" and name != "launched_server.py":
            problems.append(f"{where}: reads log_path; use contract_log(contract=...)")
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr == "log_tail" and id(node) not in messages:
            problems.append(f"{where}: log_tail() outside a failure message")
        if node.func.attr == "contract_log":
            given = [*node.args, *(k.value for k in node.keywords if k.arg == "contract")]
            reason = given[0] if len(given) == 1 else None
            if isinstance(reason, ast.Name):
                reason = ast.Constant(constants.get(reason.id))
            text = reason.value if isinstance(reason, ast.Constant) else None
            if not isinstance(text, str) or len(text.split()) < 3:
                problems.append(f"{where}: contract_log needs the contract as a literal of a few words")
    return problems


def test_every_log_read_of_the_tests_names_its_contract():
    problems = [p for path in sorted(TESTS.glob("*.py")) for p in log_read_problems(path.read_text(), path.name)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_log_read_without_a_contract():
    bad = """
def test_x(server):
    assert "x" in server.contract_log("")
    assert "y" in server.contract_log(reason)
    assert "z" in server.log_path.read_text()
    print(server.log_tail())
"""
    assert len(log_read_problems(bad, "test_bad.py")) == 4
    good = """
WHY = "the one-line start-up refusal"
def test_x(server):
    assert "x" in server.contract_log("the access line's fields")
    assert "y" in server.contract_log(contract=WHY), server.log_tail()
    raise AssertionError(server.log_tail(100))
"""
    assert log_read_problems(good, "test_good.py") == []
