"""native.py's one table of the compiled functions' signatures (SIGNATURES) against native.c:
every parameter's name and ctypes type as the C source declares it, so that a change to a C
function that the table does not follow fails here instead of misreading arguments."""

import ctypes
import pathlib
import re

from horovod_tnq.core import native

SOURCE = pathlib.Path(native.__file__).with_name("native.c").read_text()
CODE = re.sub(r"/\*.*?\*/", "", SOURCE, flags=re.S).replace("\\\n", "\n")


def c_parameters(name):
    """[(C type, name)] of function ``name``'s parameters in native.c (defined directly, or by a
    DEFINE_* macro whose function is NAME)."""
    plain = re.search(r"\b%s\s*\(([^)]*)\)\s*\{" % name, CODE)
    if plain is not None:
        text = plain.group(1)
    else:
        macro = re.search(r"\b(DEFINE_\w+)\(%s\b" % name, CODE).group(1)
        text = re.search(r"#define %s\(NAME[^)]*\).*?\bNAME\s*\(([^)]*)\)" % macro, CODE,
                         re.S).group(1)
    if text.strip() == "void":
        return []
    return [tuple(re.fullmatch(r"\s*(.*?)\s*(\w+)\s*", p).groups()) for p in text.split(",")]


def ctype(c_type):
    if "*" in c_type:
        return ctypes.c_void_p
    return {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "uint32_t": ctypes.c_uint32,
            "unsigned": ctypes.c_uint32, "double": ctypes.c_double}[c_type]


def test_signatures_match_native_c():
    checked = 0
    for pattern, (_, argtypes, names) in native.SIGNATURES.items():
        variants = [pattern[:-1] + s for s in ("f32", "f64")] if pattern.endswith("_*") \
            else [pattern]
        for name in variants:
            parameters = c_parameters(name)
            assert [p for _, p in parameters] == names.split(), name
            assert [ctype(t) for t, _ in parameters] == list(argtypes), name
            checked += 1
    assert checked == 17


def test_the_library_uses_the_table():
    if native.LIBRARY is None:  # (the build test in test_core_native.py says why)
        return
    for pattern, (restype, argtypes, _) in native.SIGNATURES.items():
        name = pattern[:-1] + "f32" if pattern.endswith("_*") else pattern
        function = getattr(native.LIBRARY, name)
        assert (list(function.argtypes), function.restype) == (list(argtypes), restype)


def test_shared_constants_match_native_c():
    # native.py sizes the kernels' scratch from these: a different value in native.c would
    # overrun it
    value = re.search(r"#define RUNS_CHUNK (\d+)", SOURCE)
    assert value is not None and int(value.group(1)) == native.RUNS_CHUNK
