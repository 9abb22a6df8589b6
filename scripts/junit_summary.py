"""Prints how many tests ran, and how many of them were privileged (BPF/netns) tests,
from nextest's JUnit report. Fails if CI=true and no privileged test ran."""
import os
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
total = passed = priv = priv_passed = 0
for case in root.iter("testcase"):
    total += 1
    ok = case.find("failure") is None and case.find("error") is None and case.find("skipped") is None
    passed += ok
    if "privileged" in case.get("name", ""):
        priv += 1
        priv_passed += ok
print(f"[test] summary: {passed}/{total} tests passed; privileged (BPF/netns) tests run: {priv}, passed: {priv_passed}")
if os.environ.get("CI") == "true" and priv == 0:
    print("[test] CI=true but no privileged test ran", file=sys.stderr)
    sys.exit(1)
