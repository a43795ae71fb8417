"""Energy (kWh) and CO2 (kg) of a run, measured by codecarbon in offline mode.

codecarbon samples power in background threads (every `measure_secs`, plus a light 1 s
monitor), so the training loop is not touched. What it measures with depends on the machine,
and the result says which:

  CPU   'RAPL' (the CPU's own energy counters, Linux with read access to /sys/class/powercap),
        else 'TDP estimate' (the CPU model's TDP from codecarbon's table, or 4 W per thread when
        the model is unknown, scaled by the process's CPU load)
  GPU   'GPU power (NVML)' / 'GPU power (AMD SMI)': the driver's power readings
  RAM   'estimate' (codecarbon's per-GB power model)

CO2 = energy x the carbon intensity of the grid: from the country (and region) given in
`track.country` / `track.region`, else $SLIMTUNE_COUNTRY / $SLIMTUNE_REGION, else the world
average (475 g CO2e/kWh, codecarbon's figure); `track.carbon_intensity` overrides all of them.
Measuring never fails a run: a problem ends up as `error` in the result.
"""
from __future__ import annotations

import logging
import os

WORLD_AVERAGE_G_PER_KWH = 475.0  # codecarbon's world_average (data/private_infra/carbon_intensity_per_source.json)

_CPU_METHODS = {
    "intel_rapl": "RAPL",
    "cpu_load": "TDP estimate",
    "constant": "TDP estimate",
    "intel_power_gadget": "Intel Power Gadget",
    "apple_powermetrics": "powermetrics",
    "windows_emi": "Windows EMI",
}


def _world_average() -> float:
    try:
        from codecarbon.input import DataSource

        return float(DataSource().get_carbon_intensity_per_source_data()["world_average"])
    except Exception:
        return WORLD_AVERAGE_G_PER_KWH


def grid(country: str | None, region: str | None, carbon_intensity: float | None) -> dict:
    """Where the carbon intensity comes from: config, else environment, else world average."""
    country = country or (os.environ.get("SLIMTUNE_COUNTRY") or "").strip().upper() or None
    region = region or (os.environ.get("SLIMTUNE_REGION") or "").strip().lower() or None
    if carbon_intensity is not None:
        return {"country": country, "region": region, "forced_intensity": float(carbon_intensity),
                "intensity_source": "track.carbon_intensity"}
    if country is None:
        return {"country": None, "region": None, "forced_intensity": _world_average(),
                "intensity_source": "world average (no track.country / $SLIMTUNE_COUNTRY)"}
    return {"country": country, "region": region, "forced_intensity": None,
            "intensity_source": f"grid mix of {country}" + (f" / {region}" if region else "")}


def _methods(tracker) -> dict:
    out = {"cpu": None, "gpu": None, "ram": None}
    for hw in getattr(tracker, "_hardware", []):
        kind = type(hw).__name__
        if kind == "CPU":
            mode = getattr(hw, "_mode", None)
            out["cpu"] = _CPU_METHODS.get(mode, str(mode))
            tdp = getattr(hw, "_tdp", None)
            if out["cpu"] == "TDP estimate" and tdp:
                out["cpu_tdp_w"] = tdp
        elif kind == "GPU":
            import torch

            out["gpu"] = "GPU power (AMD SMI)" if getattr(torch.version, "hip", None) else "GPU power (NVML)"
        elif kind == "RAM":
            out["ram"] = "estimate"
    return out


def method_label(methods: dict) -> str:
    """'GPU power (NVML) + TDP estimate (CPU)', the line a report shows."""
    parts = []
    if methods.get("gpu"):
        parts.append(methods["gpu"])
    if methods.get("cpu"):
        parts.append(f"{methods['cpu']} (CPU)")
    return " + ".join(parts) or "unknown"


class EnergyMeter:
    """codecarbon's OfflineEmissionsTracker, started and stopped around a run.

    `machine_wide`: measure the whole machine rather than this process (several training
    processes on one machine, measured once by the main one)."""

    def __init__(self, country=None, region=None, carbon_intensity=None, measure_secs: float = 10.0,
                 machine_wide: bool = False):
        self.grid = grid(country, region, carbon_intensity)
        self.measure_secs = measure_secs
        self.mode = "machine" if machine_wide else "process"
        self.tracker = None
        self.error: str | None = None

    def start(self) -> None:
        try:
            logging.getLogger("codecarbon").setLevel(logging.ERROR)  # before import: its init logs at INFO
            from codecarbon import OfflineEmissionsTracker

            import inspect

            # nothing written or sent anywhere: no emissions.csv, no API (codecarbon < 3 spells it save_to_file)
            kw = ({"output_methods": []}
                  if "output_methods" in inspect.signature(OfflineEmissionsTracker.__init__).parameters
                  or "output_methods" in inspect.signature(OfflineEmissionsTracker.__mro__[1].__init__).parameters
                  else {"save_to_file": False})
            if self.grid["forced_intensity"] is not None:
                kw["force_carbon_intensity_g_co2e_kwh"] = self.grid["forced_intensity"]
            self.tracker = OfflineEmissionsTracker(
                country_iso_code=self.grid["country"] or "USA",  # only names the grid; the intensity is forced above
                region=self.grid["region"] if self.grid["country"] else None,
                measure_power_secs=self.measure_secs, tracking_mode=self.mode,
                log_level="error", allow_multiple_runs=True, project_name="slimtune", **kw)
            self.tracker.start()
        except ImportError:
            self.error = "codecarbon is not installed (pip install codecarbon)"
        except Exception as e:  # never fail a run because of measuring it
            self.error = f"codecarbon could not start: {type(e).__name__}: {e}"
            self.tracker = None

    def stop(self) -> dict:
        """The energy record that goes into summary.json's cost."""
        base = {"tool": "codecarbon", "tracking_mode": self.mode, "country": self.grid["country"],
                "region": self.grid["region"], "carbon_intensity_source": self.grid["intensity_source"]}
        if self.tracker is None:
            return {**base, "energy_kwh": None, "co2_kg": None, "method": None, "error": self.error or "not started"}
        try:
            self.tracker.stop()
            d = self.tracker.final_emissions_data
            from importlib.metadata import version

            base["tool"] = f"codecarbon {version('codecarbon')}"
        except Exception as e:
            return {**base, "energy_kwh": None, "co2_kg": None, "method": None, "error": f"codecarbon failed: {e}"}
        finally:
            tracker, self.tracker = self.tracker, None
        if d is None:
            return {**base, "energy_kwh": None, "co2_kg": None, "method": None, "error": "codecarbon returned no data"}
        methods = _methods(tracker)
        kwh = float(d.energy_consumed or 0.0)
        co2 = float(d.emissions or 0.0)
        return {
            **base,
            "energy_kwh": kwh, "co2_kg": co2,
            "cpu_kwh": float(d.cpu_energy or 0.0), "gpu_kwh": float(d.gpu_energy or 0.0),
            "ram_kwh": float(d.ram_energy or 0.0),
            "cpu_power_w": float(d.cpu_power or 0.0), "gpu_power_w": float(d.gpu_power or 0.0),
            "duration_s": float(d.duration or 0.0),
            "carbon_intensity_g_per_kwh": (co2 / kwh * 1000.0) if kwh > 0 else self.grid["forced_intensity"],
            "method": method_label(methods), "methods": methods,
            "cpu_model": getattr(d, "cpu_model", None), "gpu_model": getattr(d, "gpu_model", None) or None,
        }
