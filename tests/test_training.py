"""training.py's process-level setting: the allocator keeps freed memory (keep_freed_memory)."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

# Run in a child: the setting lasts for the whole process, and the child's environment is under control.
CHILD = textwrap.dedent("""
    import json, resource
    import torch
    from alignkit.training import keep_freed_memory

    def faults_of_an_allocation(n=64 << 20):  # 64 MB: over glibc's largest mmap threshold (32 MB)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(n // 4); x.fill_(1.0); del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = [faults_of_an_allocation() for _ in range(3)]
    applied = keep_freed_memory()
    # the heap grows for the first few (each freed block is a little short of the next aligned request
    # until freed blocks coalesce), then serves every allocation from memory already faulted in
    kept = [faults_of_an_allocation() for _ in range(10)]
    print(json.dumps({"default": default, "applied": applied, "kept": kept}))
""")


def run_child(**env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", CHILD], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


GLIBC = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc parameters")


@GLIBC
def test_freed_memory_is_reused_without_page_faults():
    got = run_child()
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert got["applied"] is True
    assert all(f > pages // 2 for f in got["default"])  # glibc maps and faults in the 64 MB anew every time
    assert all(f < pages // 20 for f in got["kept"][-4:])  # kept: reused, no page faulted in again


@GLIBC
def test_the_users_own_malloc_settings_are_left_alone():
    got = run_child(MALLOC_ARENA_MAX="2")
    assert got["applied"] is False
    assert all(f > (64 << 20) // os.sysconf("SC_PAGE_SIZE") // 2 for f in got["kept"])  # nothing changed
