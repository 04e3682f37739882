"""Language registry: how to compile and run each SandboxFusion language, and where its toolchain is.

Each `Language` is a recipe (source file name, compile and run argv templates); `discover()` finds the
toolchains installed on this host and resolves every recipe into a `Runtime` whose argv uses paths
*inside* the sandbox. The sandbox sees the host's /usr read-only; a toolchain installed elsewhere (a
rustup toolchain under ~/.rustup, Go under /usr/local/go) is bound read-only at
/opt/toolchains/<language>, never the home directory around it.

User Python runs on the host's system interpreter (`SandboxConfig.python`, /usr/bin/python3 by
default), not on the service's own virtualenv, so model-written programs see a plain stdlib Python.

Every SandboxFusion language is listed by `/health`: those with a recipe here and a toolchain on the
host as available, with the toolchain's version; the rest with the reason (toolchain not found, or no
recipe in this service). `c` is codelm's addition (SandboxFusion has no C runner).

Argv templates use `{source}` (the program file), `{main}` (Java's main class), `{memory_mb}` (the
run's memory limit, for runtimes that size their heap themselves) and one placeholder per tool.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping

from sandbox.config import SandboxConfig

SANDBOX_TOOLCHAINS = "/opt/toolchains"


@dataclasses.dataclass(frozen=True)
class Step:
    """One command. `limit_address_space`: apply RLIMIT_AS; off for runtimes (JVM, V8, Go) that
    reserve far more virtual memory than they use — their memory is bounded by the memory cgroup
    and their own heap flags instead."""

    argv: tuple[str, ...]
    limit_address_space: bool = True


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """A located toolchain: tool placeholder -> path inside the sandbox, the read-only host
    directories to bind as (host, sandbox) pairs, and environment variables it needs."""

    tools: Mapping[str, str]
    binds: tuple[tuple[str, str], ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    version: str = ""  # what the toolchain says of itself, e.g. "g++ (Debian 12.2.0-14) 12.2.0"


class ToolchainMissing(Exception):
    """The toolchain for a language is not installed; the message says what was looked for."""


@dataclasses.dataclass(frozen=True)
class Language:
    name: str  # SandboxFusion's language identifier
    source: str  # program file name; Java derives it from the public class instead
    run: Step
    locate: Callable[[SandboxConfig], Toolchain]
    compile: Step | None = None


@dataclasses.dataclass(frozen=True)
class Runtime:
    """A language whose toolchain was found: produces the concrete argv for one program."""

    language: Language
    toolchain: Toolchain

    @property
    def name(self) -> str:
        return self.language.name

    def source_name(self, code: str) -> str:
        if self.language.name in ("java", "junit"):
            return f"{java_main_class(code)}.java"
        return self.language.source

    def argv(self, step: Step, code: str, memory_mb: int) -> list[str]:
        source = self.source_name(code)
        values = dict(self.toolchain.tools, source=source, main=source.removesuffix(".java"),
                      memory_mb=str(memory_mb))
        return [part.format(**values) for part in step.argv]


_JAVA_PUBLIC_CLASS = re.compile(r"^\s*public\s+(?:(?:final|abstract)\s+)*class\s+([A-Za-z_$][\w$]*)", re.MULTILINE)


def java_main_class(code: str) -> str:
    """Java requires a public class to live in `<Class>.java`; programs without one use `Main`."""
    match = _JAVA_PUBLIC_CLASS.search(code)
    return match.group(1) if match else "Main"


# ---------------------------------------------------------------------------------------------------
# Locating toolchains on the host.

def _search_path() -> list[str]:
    extra = ["/usr/local/bin", "/usr/bin", "/bin", "/usr/local/go/bin", os.path.expanduser("~/.cargo/bin")]
    return [d for d in os.environ.get("PATH", "").split(os.pathsep) if d] + extra


def _which(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join(_search_path()))
    if found is None:
        raise ToolchainMissing(f"`{name}` not found on PATH")
    return found


def _under_usr(path: str) -> bool:
    return os.path.realpath(path).startswith("/usr/")


def _executable(host_path: str, language: str) -> Toolchain:
    """A single executable: used in place when it lives under /usr, else its install prefix (the
    parent of its bin/ directory) is bound at /opt/toolchains/<language>."""
    real = os.path.realpath(host_path)
    if not (os.path.isfile(real) and os.access(real, os.X_OK)):
        raise ToolchainMissing(f"{host_path} is not an executable file")
    if _under_usr(real):
        return Toolchain(tools={language: real})
    prefix = os.path.dirname(os.path.dirname(real))
    inside = f"{SANDBOX_TOOLCHAINS}/{language}"
    return Toolchain(tools={language: inside + real[len(prefix):]}, binds=((prefix, inside),))


def _query(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise ToolchainMissing(f"`{' '.join(argv)}` failed: {e}") from None
    return out.stdout.strip()


def _tool_in_root(root: str, relative: str, language: str, tool: str, env_var: str | None = None) -> Toolchain:
    """A toolchain installed as one directory tree (a Rust sysroot, a GOROOT)."""
    if not os.path.isfile(os.path.join(root, relative)):
        raise ToolchainMissing(f"{os.path.join(root, relative)} does not exist")
    inside = root if _under_usr(root) else f"{SANDBOX_TOOLCHAINS}/{language}"
    binds = () if inside == root else ((root, inside),)
    env = {env_var: inside} if env_var else {}
    return Toolchain(tools={tool: f"{inside}/{relative}"}, binds=binds, env=env)


def _version(argv: list[str]) -> str:
    """The first line a toolchain prints about its version (java and perl print it to stderr)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise ToolchainMissing(f"`{' '.join(argv)}` failed: {e}") from None
    lines = [line.strip() for line in (out.stdout + "\n" + out.stderr).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _versioned(locate: Callable[[SandboxConfig], Toolchain],
               version: Callable[[SandboxConfig], list[str]]) -> Callable[[SandboxConfig], Toolchain]:
    """`locate`, then ask the host tool for its version (argv with host paths)."""
    def located(config: SandboxConfig) -> Toolchain:
        found = locate(config)
        return dataclasses.replace(found, version=_version(version(config)))
    return located


def _locate_python(config: SandboxConfig) -> Toolchain:
    return _executable(config.python, "python")


def _locate_simple(tool: str, binary: str | None = None) -> Callable[[SandboxConfig], Toolchain]:
    def locate(config: SandboxConfig) -> Toolchain:
        return _executable(_which(binary or tool), tool)
    return _versioned(locate, lambda config: [_which(binary or tool), "--version"])


def _locate_java(config: SandboxConfig) -> Toolchain:
    java, javac = _executable(_which("java"), "java"), _executable(_which("javac"), "javac")
    if java.binds or javac.binds:
        raise ToolchainMissing("java/javac outside /usr are not supported; install a JDK package")
    return Toolchain(tools={"java": java.tools["java"], "javac": javac.tools["javac"]},
                     version=f"{_version([_which('javac'), '-version'])}; {_version([_which('java'), '-version'])}")


def _locate_rust(config: SandboxConfig) -> Toolchain:
    # `--print sysroot` sees through rustup's proxy binaries to the real toolchain directory.
    sysroot = _query([_which("rustc"), "--print", "sysroot"])
    _which("cc")  # rustc links through the system C compiler
    found = _tool_in_root(sysroot, "bin/rustc", "rust", "rustc")
    return dataclasses.replace(found, version=_version([os.path.join(sysroot, "bin/rustc"), "--version"]))


def _locate_go(config: SandboxConfig) -> Toolchain:
    goroot = _query([_which("go"), "env", "GOROOT"])
    found = _tool_in_root(goroot, "bin/go", "go", "go", env_var="GOROOT")
    return dataclasses.replace(found, version=_version([os.path.join(goroot, "bin/go"), "version"]))


# pytest and what it imports at run time (on Python >= 3.11): top-level packages or modules.
PYTEST_PACKAGES = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py")


def _locate_pytest(config: SandboxConfig) -> Toolchain:
    """The user interpreter's own pytest when it has one; else the service's pytest, its package
    directories bound read-only at /opt/toolchains/pytest (on PYTHONPATH), when both interpreters are
    the same Python minor version (pytest is pure Python)."""
    python = _locate_python(config)
    try:
        return dataclasses.replace(python, version=_version([config.python, "-m", "pytest", "--version"]))
    except ToolchainMissing:
        pass
    user = _query([config.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if user != ours:
        raise ToolchainMissing(f"{config.python} (Python {user}) has no pytest, and the service's pytest is for "
                               f"Python {ours}")
    inside = f"{SANDBOX_TOOLCHAINS}/pytest"
    binds = []
    for package in PYTEST_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not (spec.submodule_search_locations or spec.origin):
            raise ToolchainMissing(f"{config.python} has no pytest, and the service lacks the package {package!r}")
        if spec.submodule_search_locations:
            binds.append((os.path.realpath(list(spec.submodule_search_locations)[0]), f"{inside}/{package}"))
        else:  # a single-file module
            binds.append((os.path.realpath(spec.origin), f"{inside}/{os.path.basename(spec.origin)}"))
    version = f"pytest {importlib.metadata.version('pytest')} (the service's, on {config.python} {user})"
    return Toolchain(tools=python.tools, binds=tuple(binds), env={"PYTHONPATH": inside}, version=version)


# JUnit 5 (Jupiter) from local jars: the Maven cache or Debian's /usr/share/java. Nothing is downloaded.
JUNIT_SEARCH = (os.path.expanduser("~/.m2/repository"), "/usr/share/java")
_JUNIT_RUNNER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime")
JUNIT_RUNNER_CLASS = "CodelmJUnitRunner"  # sandbox/runtime/CodelmJUnitRunner.java


def _jar(name: str, version: str | None = None) -> str | None:
    """The newest (or the given) version of a jar in JUNIT_SEARCH, as `name-<version>.jar`."""
    found: list[tuple[tuple[int, ...], str]] = []
    for root in JUNIT_SEARCH:
        for path in glob.glob(os.path.join(root, "**", f"{name}-{version or '*'}.jar"), recursive=True):
            match = re.fullmatch(re.escape(name) + r"-(\d+(?:\.\d+)*)\.jar", os.path.basename(path))
            if match:
                found.append((tuple(int(part) for part in match.group(1).split(".")), path))
    return max(found)[1] if found else None


def _locate_junit(config: SandboxConfig) -> Toolchain:
    """JUnit Jupiter 5.N.M with its matching platform 1.N.M jars, opentest4j and apiguardian; the jars
    are bound at /opt/toolchains/junit/<jar>, the runner's source directory at .../runner."""
    java = _locate_java(config)
    api = _jar("junit-jupiter-api")
    candidates = sorted({os.path.basename(p)[len("junit-jupiter-api-"):-4]
                         for root in JUNIT_SEARCH
                         for p in glob.glob(os.path.join(root, "**", "junit-jupiter-api-5.*.jar"), recursive=True)},
                        key=lambda v: tuple(int(x) for x in re.findall(r"\d+", v)), reverse=True)
    for jupiter in candidates:
        platform = "1." + jupiter.split(".", 1)[1]
        jars = [_jar("junit-jupiter-api", jupiter), _jar("junit-jupiter-engine", jupiter),
                _jar("junit-platform-commons", platform), _jar("junit-platform-engine", platform),
                _jar("junit-platform-launcher", platform), _jar("opentest4j"), _jar("apiguardian-api")]
        if all(jars):
            break
    else:
        raise ToolchainMissing(f"no complete JUnit 5 jar set (jupiter api+engine 5.N, platform commons+engine+launcher "
                               f"1.N, opentest4j, apiguardian) under {' or '.join(JUNIT_SEARCH)}"
                               + ("" if api else ": no junit-jupiter-api jar"))
    inside = f"{SANDBOX_TOOLCHAINS}/junit"
    # The jars themselves (Maven's cache directories are often private to their owner).
    binds = [(jar, f"{inside}/{os.path.basename(jar)}") for jar in jars]
    classpath = ":".join(target for _, target in binds)
    binds.append((_JUNIT_RUNNER_DIR, f"{inside}/runner"))
    return Toolchain(tools={**java.tools, "classpath": classpath,
                            "runner": f"{inside}/runner/{JUNIT_RUNNER_CLASS}.java"},
                     binds=tuple(binds), version=f"JUnit Jupiter {jupiter} (platform {platform}); {java.version}")


_GO_ENV = {"GOCACHE": "/tmp/go-cache", "GOPATH": "/tmp/go", "GOTOOLCHAIN": "local", "GO111MODULE": "off"}


def _with_env(locate: Callable[[SandboxConfig], Toolchain], env: Mapping[str, str]) -> Callable[[SandboxConfig], Toolchain]:
    def located(config: SandboxConfig) -> Toolchain:
        found = locate(config)
        return dataclasses.replace(found, env={**env, **found.env})
    return located


_JAVA_RUN = ("{java}", "-Xmx{memory_mb}m", "-Xss64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
_JAVAC = ("{javac}", "-J-Xss8m", "-J-XX:+UseSerialGC", "-encoding", "UTF-8")

LANGUAGES: tuple[Language, ...] = (
    Language("python", "main.py", run=Step(("{python}", "{source}")),
             locate=_versioned(_locate_python, lambda config: [config.python, "--version"])),
    Language("pytest", "test_main.py", run=Step(("{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                 "{source}")), locate=_locate_pytest),
    Language(
        "cpp", "main.cpp",
        compile=Step(("{gxx}", "-std=c++17", "-O2", "-pipe", "-o", "main", "{source}", "-lm", "-pthread")),
        run=Step(("./main",)), locate=_locate_simple("gxx", "g++"),
    ),
    Language(
        "c", "main.c",
        compile=Step(("{gcc}", "-std=gnu17", "-O2", "-pipe", "-o", "main", "{source}", "-lm", "-pthread")),
        run=Step(("./main",)), locate=_locate_simple("gcc"),
    ),
    Language(
        "java", "Main.java", compile=Step((*_JAVAC, "{source}"), limit_address_space=False),
        run=Step((*_JAVA_RUN, "-cp", ".", "{main}"), limit_address_space=False), locate=_locate_java,
    ),
    Language(
        "junit", "Main.java",
        compile=Step((*_JAVAC, "-cp", "{classpath}", "-d", ".", "{source}", "{runner}"), limit_address_space=False),
        run=Step((*_JAVA_RUN, "-cp", ".:{classpath}", JUNIT_RUNNER_CLASS), limit_address_space=False),
        locate=_locate_junit,
    ),
    Language("nodejs", "main.js", run=Step(("{node}", "--max-old-space-size={memory_mb}", "{source}"),
                                           limit_address_space=False), locate=_locate_simple("node")),
    Language(
        "go", "main.go",
        compile=Step(("{go}", "build", "-o", "main", "{source}"), limit_address_space=False),
        run=Step(("./main",), limit_address_space=False), locate=_with_env(_locate_go, _GO_ENV),
    ),
    Language(
        "rust", "main.rs",
        compile=Step(("{rustc}", "--edition", "2021", "-O", "-o", "main", "{source}")),
        run=Step(("./main",)), locate=_locate_rust,
    ),
    Language("bash", "main.sh", run=Step(("{bash}", "{source}")), locate=_locate_simple("bash")),
    Language("perl", "main.pl", run=Step(("{perl}", "{source}")), locate=_locate_simple("perl")),
)

# SandboxFusion languages this service has no recipe for, with the tools SandboxFusion runs them with:
# listed by /health as unavailable, saying whether those tools are on this host.
WITHOUT_RECIPE: Mapping[str, tuple[str, ...]] = {
    "go_test": ("go",), "typescript": ("tsx",), "jest": ("npm", "jest"), "php": ("php",), "csharp": ("dotnet",),
    "sql": ("sqlite3",), "cuda": ("nvcc",), "lua": ("lua",), "R": ("Rscript",), "D_ut": ("dmd",), "ruby": ("ruby",),
    "scala": ("scala",), "julia": ("julia",), "kotlin_script": ("kotlinc",), "verilog": ("iverilog",),
    "python_gpu": ("nvidia-smi",), "lean": ("lean",), "swift": ("swift",), "racket": ("racket",),
}


def _no_recipe_reason(tools: tuple[str, ...]) -> str:
    found = [tool for tool in tools if shutil.which(tool, path=os.pathsep.join(_search_path()))]
    missing = [tool for tool in tools if tool not in found]
    state = (f"`{'`, `'.join(missing)}` not found on PATH" if missing else
             f"`{'`, `'.join(found)}` found, but no recipe is tested for it")
    return f"no recipe in this service ({state})"


@dataclasses.dataclass(frozen=True)
class Registry:
    """Languages this service knows: `runtimes` for those whose toolchain was found, `missing` maps
    the rest to the reason."""

    runtimes: Mapping[str, Runtime]
    missing: Mapping[str, str]

    def describe(self) -> dict[str, dict[str, object]]:
        """JSON-ready availability report, for startup logs and the health endpoint."""
        report: dict[str, dict[str, object]] = {}
        for language in LANGUAGES:
            if language.name in self.runtimes:
                toolchain = self.runtimes[language.name].toolchain
                report[language.name] = {"available": True, "version": toolchain.version, "tools": dict(toolchain.tools)}
            else:
                report[language.name] = {"available": False, "reason": self.missing[language.name]}
        for name in WITHOUT_RECIPE:
            report[name] = {"available": False, "reason": self.missing[name]}
        return report


def discover(config: SandboxConfig) -> Registry:
    runtimes: dict[str, Runtime] = {}
    missing: dict[str, str] = {}
    for language in LANGUAGES:
        try:
            runtimes[language.name] = Runtime(language, language.locate(config))
        except ToolchainMissing as e:
            missing[language.name] = str(e)
    for name, tools in WITHOUT_RECIPE.items():
        missing[name] = _no_recipe_reason(tools)
    return Registry(runtimes, missing)
