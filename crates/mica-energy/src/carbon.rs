//! Grid carbon intensity and PUE. CO2e = energy x PUE x intensity.
//!
//! The intensity comes from a country (vendored table with source and year), an explicit value,
//! or, when neither is given, the world average, which is flagged in every output: a silent
//! world average is one of the known failures of existing trackers.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::util::split_csv_line;
use crate::EnergyError;

const INTENSITY_CSV: &str = include_str!("../data/carbon_intensity.csv");

/// CodeCarbon's `world_average` (IEA Global Energy & CO2 Status Report 2019), gCO2e/kWh.
pub const WORLD_AVERAGE_G_PER_KWH: f64 = 475.0;
const WORLD_AVERAGE_SOURCE: &str =
    "world average 475 gCO2e/kWh (IEA Global Energy & CO2 Status Report 2019, via CodeCarbon)";
const TABLE_SOURCE: &str = "Our World in Data electricity data (Ember, Energy Institute), via CodeCarbon 3.3.2 global_energy_mix.json";

/// One row of the vendored table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountryIntensity {
    pub iso_code: String,
    pub country_name: String,
    pub g_per_kwh: f64,
    pub year: u16,
}

fn table() -> &'static [CountryIntensity] {
    static TABLE: OnceLock<Vec<CountryIntensity>> = OnceLock::new();
    TABLE.get_or_init(|| {
        INTENSITY_CSV
            .lines()
            .filter(|l| !l.starts_with('#'))
            .skip(1)
            .filter_map(|l| {
                let f = split_csv_line(l);
                Some(CountryIntensity {
                    iso_code: f.first()?.clone(),
                    country_name: f.get(1)?.clone(),
                    g_per_kwh: f.get(2)?.parse().ok()?,
                    year: f.get(3)?.parse().ok()?,
                })
            })
            .collect()
    })
}

/// Looks up a country by ISO 3166-1 alpha-3 code (case-insensitive).
pub fn country_intensity(iso: &str) -> Option<&'static CountryIntensity> {
    let iso = iso.trim().to_uppercase();
    table().iter().find(|c| c.iso_code == iso)
}

/// Every country in the table, for listing.
pub fn countries() -> &'static [CountryIntensity] {
    table()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntensitySource {
    Country,
    Explicit,
    WorldAverageFallback,
}

/// The carbon settings of a run, carried into the report with their provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CarbonConfig {
    pub intensity_g_per_kwh: f64,
    pub source: IntensitySource,
    /// Where the number comes from, in words.
    pub source_detail: String,
    pub country_iso_code: Option<String>,
    pub country_name: Option<String>,
    pub year: Option<u16>,
    pub pue: f64,
}

impl CarbonConfig {
    /// `--grid-intensity` wins over `--country` (the country is still recorded); neither gives
    /// the world average with a warning. PUE defaults to 1.0 (energy at the machine only).
    pub fn resolve(
        country: Option<&str>,
        grid_intensity: Option<f64>,
        pue: Option<f64>,
    ) -> Result<CarbonConfig, EnergyError> {
        let pue = pue.unwrap_or(1.0);
        if !pue.is_finite() || !(1.0..=5.0).contains(&pue) {
            return Err(EnergyError::Config(format!(
                "--pue {pue}: must be between 1.0 (no facility overhead) and 5.0"
            )));
        }
        let found = match country {
            Some(c) => Some(country_intensity(c).ok_or_else(|| {
                EnergyError::Config(format!(
                    "--country {c}: not in the carbon-intensity table; use an ISO 3166-1 alpha-3 code such as FRA, USA, DEU, IND (or give --grid-intensity G)"
                ))
            })?),
            None => None,
        };
        if let Some(g) = grid_intensity {
            if !g.is_finite() || !(0.0..=2000.0).contains(&g) {
                return Err(EnergyError::Config(format!(
                    "--grid-intensity {g}: must be between 0 and 2000 gCO2e/kWh"
                )));
            }
            return Ok(CarbonConfig {
                intensity_g_per_kwh: g,
                source: IntensitySource::Explicit,
                source_detail: format!("given with --grid-intensity ({g} gCO2e/kWh)"),
                country_iso_code: found.map(|c| c.iso_code.clone()),
                country_name: found.map(|c| c.country_name.clone()),
                year: None,
                pue,
            });
        }
        Ok(match found {
            Some(c) => CarbonConfig {
                intensity_g_per_kwh: c.g_per_kwh,
                source: IntensitySource::Country,
                source_detail: format!("{} {}: {TABLE_SOURCE}", c.country_name, c.year),
                country_iso_code: Some(c.iso_code.clone()),
                country_name: Some(c.country_name.clone()),
                year: Some(c.year),
                pue,
            },
            None => CarbonConfig {
                intensity_g_per_kwh: WORLD_AVERAGE_G_PER_KWH,
                source: IntensitySource::WorldAverageFallback,
                source_detail: WORLD_AVERAGE_SOURCE.into(),
                country_iso_code: None,
                country_name: None,
                year: Some(2019),
                pue,
            },
        })
    }

    pub fn is_world_average_fallback(&self) -> bool {
        self.source == IntensitySource::WorldAverageFallback
    }

    /// The loud line printed and stored when the world average stands in for the real grid.
    pub fn warning(&self) -> Option<String> {
        self.is_world_average_fallback().then(|| {
            "NO COUNTRY OR GRID INTENSITY GIVEN: CO2 uses the WORLD AVERAGE of 475 gCO2e/kWh; real grids range from about 20 to 900. Pass --country ISO3 or --grid-intensity G".to_string()
        })
    }

    /// Grams of CO2e for `joules` of IT energy: kWh x PUE x intensity.
    pub fn co2e_g(&self, joules: f64) -> f64 {
        joules / 3.6e6 * self.pue * self.intensity_g_per_kwh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_countries_with_years() {
        assert!(countries().len() > 200);
        let fra = country_intensity("fra").unwrap();
        assert_eq!(fra.country_name, "France");
        assert!(fra.g_per_kwh > 10.0 && fra.g_per_kwh < 150.0);
        assert!(fra.year >= 2020);
        assert!(country_intensity("XXX").is_none());
    }

    #[test]
    fn co2_arithmetic() {
        let c = CarbonConfig::resolve(None, Some(400.0), Some(1.5)).unwrap();
        // 3.6 MJ = 1 kWh; x 1.5 PUE x 400 g/kWh = 600 g.
        assert!((c.co2e_g(3.6e6) - 600.0).abs() < 1e-9);
        assert_eq!(c.source, IntensitySource::Explicit);
        assert!(c.warning().is_none());
        let usa = CarbonConfig::resolve(Some("USA"), None, None).unwrap();
        assert_eq!(usa.pue, 1.0);
        assert!((usa.co2e_g(3.6e6) - usa.intensity_g_per_kwh).abs() < 1e-9);
        assert!(usa.source_detail.contains("Our World in Data"));
    }

    #[test]
    fn world_average_fallback_is_loud() {
        let c = CarbonConfig::resolve(None, None, None).unwrap();
        assert_eq!(c.intensity_g_per_kwh, 475.0);
        assert!(c.is_world_average_fallback());
        assert!(c.warning().unwrap().contains("WORLD AVERAGE"));
    }

    #[test]
    fn explicit_intensity_wins_but_country_is_kept() {
        let c = CarbonConfig::resolve(Some("DEU"), Some(100.0), None).unwrap();
        assert_eq!(c.intensity_g_per_kwh, 100.0);
        assert_eq!(c.country_iso_code.as_deref(), Some("DEU"));
    }

    #[test]
    fn bad_settings_are_errors() {
        for (country, g, pue) in [
            (Some("Frankreich"), None, None),
            (None, Some(-1.0), None),
            (None, Some(f64::NAN), None),
            (None, None, Some(0.9)),
        ] {
            assert!(CarbonConfig::resolve(country, g, pue).is_err());
        }
        let e = CarbonConfig::resolve(Some("FR"), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("alpha-3"), "{e}");
    }
}
