//! Temperature and power readings for `slmc bench`, from what the operating system exposes
//! under sysfs: thermal zones and hwmon for temperatures, powercap (RAPL) energy counters and
//! battery `power_now`/`energy_now` for power. Nothing is estimated: a reading that is not
//! exposed is reported as not exposed, with the places that were searched.

use std::path::{Path, PathBuf};

/// Where sysfs is mounted: `/sys`, or `$SLMC_SYSFS` (tests give a tree of their own).
pub fn sysfs_root() -> PathBuf {
    std::env::var_os("SLMC_SYSFS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/sys"))
}

/// The sensors found under a sysfs root.
#[derive(Debug, Clone, Default)]
pub struct Sensors {
    /// Files holding a temperature in millidegrees Celsius.
    pub temperature_files: Vec<PathBuf>,
    /// RAPL package counters (`energy_uj`) with their wrap-around range in microjoules.
    pub energy_counters: Vec<(PathBuf, Option<u64>)>,
    /// Battery `power_now` files (microwatts), read when no energy counter exists.
    pub power_files: Vec<PathBuf>,
    /// The directories searched, for the report.
    pub searched: Vec<PathBuf>,
}

/// One reading of every sensor.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// The hottest exposed temperature, in degrees Celsius.
    pub max_celsius: Option<f64>,
    /// Each energy counter's raw reading, in microjoules (see `Sensors::energy_between`).
    pub energy_counts: Vec<Option<u64>>,
    /// Instantaneous power, in watts (battery `power_now`).
    pub power_watts: Option<f64>,
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    v.sort();
    v
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn name_of(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

impl Sensors {
    pub fn discover(root: &Path) -> Sensors {
        let mut s = Sensors::default();
        let thermal = root.join("class/thermal");
        let hwmon = root.join("class/hwmon");
        let powercap = root.join("class/powercap");
        let supply = root.join("class/power_supply");
        s.searched = vec![thermal.clone(), hwmon.clone(), powercap.clone(), supply.clone()];
        for zone in sorted_entries(&thermal).into_iter().filter(|p| name_of(p).starts_with("thermal_zone")) {
            let temp = zone.join("temp");
            if read_u64(&temp).is_some() {
                s.temperature_files.push(temp);
            }
        }
        for mon in sorted_entries(&hwmon) {
            for f in sorted_entries(&mon) {
                let n = name_of(&f);
                if n.starts_with("temp") && n.ends_with("_input") && read_u64(&f).is_some() {
                    s.temperature_files.push(f);
                }
            }
        }
        // Package zones only (`intel-rapl:0`, not its sub-zones `intel-rapl:0:0`), so no
        // energy is counted twice.
        for zone in sorted_entries(&powercap) {
            let n = name_of(&zone);
            if n.matches(':').count() == 1 && read_u64(&zone.join("energy_uj")).is_some() {
                s.energy_counters.push((zone.join("energy_uj"), read_u64(&zone.join("max_energy_range_uj"))));
            }
        }
        for dev in sorted_entries(&supply) {
            let is_battery = std::fs::read_to_string(dev.join("type")).is_ok_and(|t| t.trim() == "Battery");
            if is_battery && read_u64(&dev.join("power_now")).is_some() {
                s.power_files.push(dev.join("power_now"));
            }
        }
        s
    }

    pub fn temperature_exposed(&self) -> bool {
        !self.temperature_files.is_empty()
    }

    pub fn power_exposed(&self) -> bool {
        !self.energy_counters.is_empty() || !self.power_files.is_empty()
    }

    pub fn sample(&self) -> Sample {
        let max_celsius = self
            .temperature_files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok()?.trim().parse::<i64>().ok())
            .map(|milli| milli as f64 / 1000.0)
            .reduce(f64::max);
        let energy_counts = self.energy_counters.iter().map(|(f, _)| read_u64(f)).collect();
        let powers: Vec<u64> = self.power_files.iter().filter_map(|f| read_u64(f)).collect();
        let power_watts = (!powers.is_empty()).then(|| powers.iter().sum::<u64>() as f64 / 1e6);
        Sample { max_celsius, energy_counts, power_watts }
    }

    /// Joules between two samples' counter readings, allowing one wrap-around per counter
    /// (counters are read one by one, so the sum's wrap is the sum of ranges that wrapped).
    pub fn energy_between(&self, start: &Sample, end: &Sample) -> Option<f64> {
        let mut total = 0u64;
        for (i, (_, range)) in self.energy_counters.iter().enumerate() {
            let (a, b) = (start.energy_counts.get(i).copied().flatten()?, end.energy_counts.get(i).copied().flatten()?);
            total += if b >= a { b - a } else { b + range.unwrap_or(0).checked_sub(a)? };
        }
        (!self.energy_counters.is_empty()).then_some(total as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_reads_what_a_tree_exposes_and_nothing_else() {
        let root = std::env::temp_dir().join(format!("slmc-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let w = |p: &str, v: &str| {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        };
        assert!(!Sensors::discover(&root).temperature_exposed());
        w("class/thermal/thermal_zone0/temp", "41000\n");
        w("class/thermal/cooling_device0/cur_state", "1\n");
        w("class/hwmon/hwmon1/temp2_input", "55500\n");
        w("class/powercap/intel-rapl:0/energy_uj", "999000000\n");
        w("class/powercap/intel-rapl:0/max_energy_range_uj", "1000000000\n");
        w("class/powercap/intel-rapl:0:0/energy_uj", "5\n");
        w("class/power_supply/AC/type", "Mains\n");
        w("class/power_supply/AC/power_now", "7\n");
        let s = Sensors::discover(&root);
        assert_eq!(s.temperature_files.len(), 2);
        assert_eq!(s.energy_counters.len(), 1, "sub-zones are not counted twice");
        assert!(s.power_files.is_empty(), "a mains supply is not a battery");
        let sample = s.sample();
        assert_eq!(sample.max_celsius, Some(55.5));
        assert_eq!(sample.energy_counts, vec![Some(999_000_000)]);
        w("class/powercap/intel-rapl:0/energy_uj", "1000000\n");
        // Wrapped: 1 J to the end of the range, then 1 J.
        assert_eq!(s.energy_between(&sample, &s.sample()), Some(2.0));
        let _ = std::fs::remove_dir_all(&root);
    }
}
