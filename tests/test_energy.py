"""Energy meters: RAPL counters read from a sysfs-shaped folder, wraparound, and "not measured"."""

from __future__ import annotations

from pathlib import Path

from imagegen.energy import NOT_MEASURED, Span, meter_for, nvml_meter, rapl_meter, watt_hours


def fake_rapl(root: Path, domains: dict[str, tuple[int, int]]) -> None:
    for name, (energy, wrap) in domains.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{wrap}\n")


def set_energy(root: Path, name: str, energy: int) -> None:
    (root / name / "energy_uj").write_text(f"{energy}\n")


def test_rapl_sums_packages_not_subdomains_and_unwraps(tmp_path):
    fake_rapl(tmp_path, {"intel-rapl:0": (1_000_000, 10_000_000), "intel-rapl:1": (5_000_000, 10_000_000),
                         "intel-rapl:0:0": (123, 10_000_000)})  # a core sub-domain, already inside package 0
    meter = rapl_meter(tmp_path)
    assert meter.source == "rapl" and meter.read() == 0.0
    span = Span(meter).start()
    set_energy(tmp_path, "intel-rapl:0", 3_000_000)  # +2 J
    set_energy(tmp_path, "intel-rapl:1", 1_000_000)  # wrapped: +5 J (up to 10 J), then +1 J
    set_energy(tmp_path, "intel-rapl:0:0", 9_999_999)  # ignored
    span.stop()
    assert span.joules == 2.0 + 5.0 + 1.0
    assert watt_hours(3600.0) == 1.0 and watt_hours(None) is None


def test_unreadable_or_missing_counters_are_not_measured(tmp_path):
    assert rapl_meter(tmp_path) is NOT_MEASURED  # no domains (a VM)
    fake_rapl(tmp_path, {"intel-rapl:0": (1, 10)})
    (tmp_path / "intel-rapl:0" / "energy_uj").chmod(0)
    (tmp_path / "intel-rapl:0" / "energy_uj").unlink()  # unreadable (root-only on Linux >= 5.10)
    assert rapl_meter(tmp_path) is NOT_MEASURED
    with Span(NOT_MEASURED) as span:
        pass
    assert span.joules is None and span.seconds >= 0 and not NOT_MEASURED.measured


def test_a_counter_that_breaks_mid_run_gives_none_not_a_crash(tmp_path):
    fake_rapl(tmp_path, {"intel-rapl:0": (1_000, 10_000_000)})
    meter = rapl_meter(tmp_path)
    (tmp_path / "intel-rapl:0" / "energy_uj").unlink()
    assert Span(meter).start().stop().joules is None


def test_gpu_without_nvml_is_not_measured():
    # CPU machines have no NVIDIA driver (and usually no nvidia-ml-py): never a guess.
    assert nvml_meter(0).source in ("none", "nvml:0")
    assert meter_for("cpu").source in ("none", "rapl")
