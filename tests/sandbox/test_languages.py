"""Every language whose toolchain is installed: a program reading stdin, a compile error, a runtime
error. Languages without a toolchain are skipped with the service's reason."""

import pytest

from sandbox.api import CommandRunStatus, RunCodeRequest, RunStatus, RunTestsRequest, TestCase
from sandbox.languages import java_main_class

ECHO = {
    "python": "import sys\nprint('hello', sys.stdin.read().strip())\n",
    "cpp": "#include <iostream>\n#include <string>\nint main() { std::string s; std::cin >> s; std::cout << \"hello \" << s << std::endl; }\n",
    "java": "import java.util.Scanner;\npublic class Greeter {\n  public static void main(String[] args) {\n"
            "    System.out.println(\"hello \" + new Scanner(System.in).next());\n  }\n}\n",
    "nodejs": "const s = require('fs').readFileSync(0, 'utf8').trim();\nconsole.log('hello ' + s);\n",
    "go": "package main\nimport \"fmt\"\nfunc main() { var s string; fmt.Scan(&s); fmt.Println(\"hello\", s) }\n",
    "rust": "use std::io::Read;\nfn main() { let mut s = String::new(); std::io::stdin().read_to_string(&mut s).unwrap();"
            " println!(\"hello {}\", s.trim()); }\n",
    "bash": "read name\necho \"hello $name\"\n",
    "c": "#include <stdio.h>\nint main(void) { char s[64]; scanf(\"%63s\", s); printf(\"hello %s\\n\", s); return 0; }\n",
    "perl": "my $name = <STDIN>;\nchomp $name;\nprint \"hello $name\\n\";\n",
}
BROKEN = {"cpp": "int main( {", "java": "public class Main { void }", "go": "package main\nfunc main( {", "rust": "fn main( {",
          "c": "int main(void) { return }"}
CRASH = {
    "python": "raise SystemExit(7)", "cpp": "int main() { return 7; }",
    "java": "public class Main { public static void main(String[] a) { System.exit(7); } }",
    "nodejs": "process.exit(7)", "go": "package main\nimport \"os\"\nfunc main() { os.Exit(7) }",
    "rust": "fn main() { std::process::exit(7); }", "bash": "exit 7", "c": "int main(void) { return 7; }",
    "perl": "exit 7;",
}


@pytest.fixture(scope="module")
def languages(service, run):
    return run(lambda client: client.health())["languages"]


def require(languages, language):
    if not languages[language]["available"]:
        pytest.skip(f"{language}: {languages[language]['reason']}")


@pytest.mark.parametrize("language", sorted(ECHO))
def test_reads_stdin_and_writes_stdout(run, languages, language):
    require(languages, language)
    response = run(lambda client: client.run_code(RunCodeRequest(code=ECHO[language], language=language,
                                                                 stdin="world\n", compile_timeout=60)))
    assert response.status == RunStatus.SUCCESS, response
    assert response.run_result.stdout == "hello world\n"
    compiled = language in BROKEN or language == "java"
    assert (response.compile_result is not None) == compiled


@pytest.mark.parametrize("language", sorted(BROKEN))
def test_compile_error_is_reported_and_nothing_runs(run, languages, language):
    require(languages, language)
    response = run(lambda client: client.run_code(RunCodeRequest(code=BROKEN[language], language=language,
                                                                 compile_timeout=60)))
    assert response.status == RunStatus.FAILED
    assert response.compile_result.status == CommandRunStatus.FINISHED
    assert response.compile_result.return_code != 0 and response.compile_result.stderr
    assert response.run_result is None


@pytest.mark.parametrize("language", sorted(CRASH))
def test_exit_code_is_reported(run, languages, language):
    require(languages, language)
    response = run(lambda client: client.run_code(RunCodeRequest(code=CRASH[language], language=language,
                                                                 compile_timeout=60)))
    assert response.status == RunStatus.FAILED
    assert response.run_result.status == CommandRunStatus.FINISHED and response.run_result.return_code == 7


def test_batch_compiles_once_and_judges_each_case(run, languages):
    require(languages, "cpp")
    code = "#include <cstdio>\nint main() { long a, b; std::scanf(\"%ld %ld\", &a, &b); std::printf(\"%ld\\n\", a + b); }\n"
    cases = [TestCase(stdin="1 2", expected_stdout="3"), TestCase(stdin="10 20\n", expected_stdout="30\n"),
             TestCase(stdin="2 2", expected_stdout="5"), TestCase(stdin="-1 1", expected_stdout="0")]
    response = run(lambda client: client.run_tests(RunTestsRequest(code=code, language="cpp", test_cases=cases,
                                                                   compile_timeout=60)))
    assert response.compile_result.succeeded
    assert [r.passed for r in response.test_results] == [True, True, False, True]
    assert response.test_results[2].run_result.stdout == "4\n"
    assert response.status == RunStatus.FAILED


def test_batch_stops_on_first_failure_when_asked(run):
    code = "n = int(input())\nassert n != 2\nprint(n * n)\n"
    cases = [TestCase(stdin=str(n), expected_stdout=str(n * n)) for n in (1, 2, 3)]
    response = run(lambda client: client.run_tests(RunTestsRequest(code=code, language="python", test_cases=cases,
                                                                   stop_on_first_failure=True)))
    assert [r.passed for r in response.test_results] == [True, False, False]
    assert response.test_results[1].run_result.return_code == 1 and response.test_results[2].run_result is None


def test_batch_reports_timeouts_per_case(run):
    code = "import time\nn = int(input())\ntime.sleep(n)\nprint('done')\n"
    cases = [TestCase(stdin="0", expected_stdout="done"), TestCase(stdin="30", expected_stdout="done")]
    response = run(lambda client: client.run_tests(RunTestsRequest(code=code, language="python", test_cases=cases,
                                                                   run_timeout=1)))
    first, second = response.test_results
    assert first.passed and not second.passed
    assert second.run_result.status == CommandRunStatus.TIME_LIMIT_EXCEEDED
    assert "test 1: wall-clock timeout" in response.message


def test_batch_with_compile_error_runs_no_case(run, languages):
    require(languages, "cpp")
    response = run(lambda client: client.run_tests(RunTestsRequest(code="int main( {", language="cpp",
                                                                   test_cases=[TestCase(stdin="1"), TestCase(stdin="2")])))
    assert response.status == RunStatus.FAILED and not response.compile_result.succeeded
    assert [(r.passed, r.run_result) for r in response.test_results] == [(False, None), (False, None)]


@pytest.mark.parametrize("code, expected", [
    ("public class Solution { }", "Solution"),
    ("import x;\npublic final class Fast$1 {}", "Fast$1"),
    ("class Helper {}\npublic class App {}", "App"),
    ("class Main {}", "Main"),
])
def test_java_main_class(code, expected):
    assert java_main_class(code) == expected


SANDBOX_FUSION_LANGUAGES = (  # SandboxFusion's `language` values (sandbox/runners/types.py)
    "python", "cpp", "nodejs", "go", "go_test", "java", "php", "csharp", "bash", "typescript", "sql", "rust", "cuda",
    "lua", "R", "perl", "D_ut", "ruby", "scala", "julia", "pytest", "junit", "kotlin_script", "jest", "verilog",
    "python_gpu", "lean", "swift", "racket")


def test_health_lists_every_sandbox_fusion_language_with_version_or_reason(languages):
    assert set(SANDBOX_FUSION_LANGUAGES) <= set(languages)
    for name, entry in languages.items():
        if entry["available"]:
            assert entry["version"], name
        else:
            assert entry["reason"], name
    assert languages["python"]["available"] and languages["python"]["version"].startswith("Python 3")


PYTEST_PASSING = "def add(a, b):\n    return a + b\n\ndef test_add():\n    assert add(2, 3) == 5\n"
PYTEST_FAILING = "def test_add():\n    assert 2 + 2 == 5\n\ndef test_ok():\n    pass\n"


def test_pytest_runs_the_tests_and_reports_failures(run, languages):
    require(languages, "pytest")
    passed = run(lambda client: client.run_code(RunCodeRequest(code=PYTEST_PASSING, language="pytest")))
    assert passed.status == RunStatus.SUCCESS, passed
    assert "1 passed" in passed.run_result.stdout and passed.compile_result is None
    failed = run(lambda client: client.run_code(RunCodeRequest(code=PYTEST_FAILING, language="pytest")))
    assert failed.status == RunStatus.FAILED and failed.run_result.return_code == 1
    assert "1 failed, 1 passed" in failed.run_result.stdout and "assert (2 + 2) == 5" in failed.run_result.stdout
    broken = run(lambda client: client.run_code(RunCodeRequest(code="def test_x(:\n    pass\n", language="pytest")))
    assert broken.status == RunStatus.FAILED and broken.run_result.return_code == 2  # collection error
    assert "SyntaxError" in broken.run_result.stdout


JUNIT_TEST = """import static org.junit.jupiter.api.Assertions.assertEquals;
import org.junit.jupiter.api.Test;

public class CalculatorTest {
    static int add(int a, int b) { return a + b; }

    @Test
    void addsSmallNumbers() { assertEquals(5, add(2, 3)); }

    @Test
    void addsNegativeNumbers() { assertEquals(EXPECTED, add(-2, -3)); }
}
"""


def test_junit_runs_the_tests_and_reports_failures(run, languages):
    require(languages, "junit")

    def junit(code):
        return run(lambda client: client.run_code(RunCodeRequest(code=code, language="junit", compile_timeout=60,
                                                                 run_timeout=30)))

    passed = junit(JUNIT_TEST.replace("EXPECTED", "-5"))
    assert passed.status == RunStatus.SUCCESS, passed
    assert passed.compile_result.succeeded and "2 tests successful" in passed.run_result.stdout
    failed = junit(JUNIT_TEST.replace("EXPECTED", "-6"))
    assert failed.status == RunStatus.FAILED and failed.run_result.return_code == 1
    assert "1 tests failed" in failed.run_result.stdout and "expected: <-6> but was: <-5>" in failed.run_result.stdout
    broken = junit(JUNIT_TEST.replace("EXPECTED", "undefinedName"))
    assert broken.status == RunStatus.FAILED and broken.run_result is None
    assert broken.compile_result.return_code != 0 and "cannot find symbol" in broken.compile_result.stderr
