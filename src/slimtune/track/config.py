"""The `track` config section: run index, energy / CO2 and the optional external trackers."""
from __future__ import annotations

import re

from pydantic import Field, field_validator

from ..schema import StrictModel


class TrackConfig(StrictModel):
    index: bool = Field(True, description="register the run in <output.dir>/index.sqlite "
                        "(`slimtune runs list / show / compare`)")
    energy: bool = Field(True, description="measure energy (kWh) and CO2 (kg) with codecarbon, offline, "
                         "in a background thread")
    country: str | None = Field(
        None,
        description="3-letter ISO code of the country whose grid powers the machine (FRA, USA, DEU, ...), for the CO2 "
        "estimate; default: $SLIMTUNE_COUNTRY, else the world-average carbon intensity (475 g CO2e/kWh)",
    )
    region: str | None = Field(None, description="region inside the country for a finer grid mix "
                               "(e.g. california for USA, quebec for CAN); default: $SLIMTUNE_REGION")
    carbon_intensity: float | None = Field(None, gt=0, description="grid carbon intensity in g CO2e/kWh; "
                                           "overrides country / region")
    measure_secs: float = Field(10.0, ge=1.0, description="interval of codecarbon's power measurements (seconds)")
    mlflow: bool = Field(False, description="also log params, metrics and cost to MLflow "
                         "(pip install 'slimtune[track]')")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; "
                                   "default: file:<output.dir>/mlruns (a local store)")
    mlflow_experiment: str = Field("slimtune", description="MLflow experiment name")
    tensorboard: bool = Field(False, description="also write TensorBoard event files (pip install 'slimtune[track]')")
    tensorboard_dir: str | None = Field(None, description="TensorBoard log folder; default: <run folder>/tensorboard")
    sweep: str | None = Field(None, description="folder of the sweep this run belongs to (set by the sweep runner): "
                              "the run is then registered in the index of the sweep's output root "
                              "(the sweep folder's parent), with the sweep as its parent")

    @field_validator("country")
    @classmethod
    def _iso3(cls, v):
        if v is None:
            return v
        if not re.fullmatch(r"[A-Za-z]{3}", v):
            raise ValueError("give a 3-letter ISO 3166 country code such as FRA, USA or DEU")
        return v.upper()
