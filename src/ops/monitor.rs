//! The monitor thread: samples the hardware every `monitor.interval_s` and
//! drives the thermal throttle.
//!
//! Sensors sit behind the `Sensor` trait: NVML for an NVIDIA GPU
//! (temperature, VRAM, power, utilisation, clocks), and a file holding a
//! temperature, which covers the kernel's thermal zones and hwmon inputs as
//! well as tests (`monitor.temp_file`). Without a GPU the CPU's thermal zone is
//! found automatically. The thread publishes a `Snapshot` and a `throttled`
//! flag that the engine reads between steps; it never blocks anyone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::config;
use crate::ops::thermal::{Change, Throttle};

/// What the sensors said at the last sample; `None`: not known.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// The temperature the throttle acts on, in °C.
    pub temp_c: Option<f64>,
    /// Where `temp_c` comes from.
    pub temp_source: Option<String>,
    pub gpu: Option<GpuSample>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GpuSample {
    pub name: String,
    pub temp_c: Option<f64>,
    pub vram_used_mb: Option<u64>,
    pub vram_free_mb: Option<u64>,
    pub vram_total_mb: Option<u64>,
    pub power_w: Option<f64>,
    pub util_pct: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
}

/// Published by the monitor thread, read by the engine and the reactor.
#[derive(Debug, Default)]
pub struct Shared {
    snapshot: Mutex<Snapshot>,
    throttled: AtomicBool,
    /// Times the throttle engaged since start.
    pub throttle_events: AtomicU64,
}

impl Shared {
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True while the engine must pause between steps.
    pub fn throttled(&self) -> bool {
        self.throttled.load(Ordering::Relaxed)
    }
}

/// One source of readings.
pub trait Sensor: Send {
    fn describe(&self) -> String;
    /// Fills what it knows into `snap`; a temperature already there (from a
    /// sensor listed earlier) is kept.
    fn sample(&mut self, snap: &mut Snapshot) -> Result<(), String>;
}

/// A file whose content is a temperature: `45`, `45.5` (°C) or `45500`
/// (millidegrees, as in /sys/class/thermal/thermal_zone*/temp and hwmon's temp*_input).
pub struct FileSensor {
    path: PathBuf,
}

impl FileSensor {
    pub fn new(path: impl Into<PathBuf>) -> FileSensor {
        FileSensor { path: path.into() }
    }
}

impl Sensor for FileSensor {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn sample(&mut self, snap: &mut Snapshot) -> Result<(), String> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        let t = parse_temp(&text)
            .ok_or_else(|| format!("{} holds no temperature", self.path.display()))?;
        if snap.temp_c.is_none() {
            snap.temp_c = Some(t);
            snap.temp_source = Some(self.describe());
        }
        Ok(())
    }
}

/// °C from a sensor file; values of 200 and more are millidegrees.
pub fn parse_temp(text: &str) -> Option<f64> {
    let v: f64 = text.trim().parse().ok()?;
    if !v.is_finite() {
        return None;
    }
    Some(if v.abs() >= 200.0 { v / 1000.0 } else { v })
}

/// The first NVIDIA GPU, through libnvidia-ml (loaded at run time, so the
/// binary runs where the driver is absent).
pub struct NvmlSensor {
    nvml: nvml_wrapper::Nvml,
    name: String,
}

impl NvmlSensor {
    pub fn open() -> Result<NvmlSensor, String> {
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| e.to_string())?;
        let name = nvml
            .device_by_index(0)
            .and_then(|d| d.name())
            .map_err(|e| e.to_string())?;
        Ok(NvmlSensor { nvml, name })
    }
}

impl Sensor for NvmlSensor {
    fn describe(&self) -> String {
        format!("NVML GPU 0 ({})", self.name)
    }

    fn sample(&mut self, snap: &mut Snapshot) -> Result<(), String> {
        use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
        let d = self.nvml.device_by_index(0).map_err(|e| e.to_string())?;
        let mb = |b: u64| b / (1024 * 1024);
        let mem = d.memory_info().ok();
        let gpu = GpuSample {
            name: self.name.clone(),
            temp_c: d.temperature(TemperatureSensor::Gpu).ok().map(f64::from),
            vram_used_mb: mem.as_ref().map(|m| mb(m.used)),
            vram_free_mb: mem.as_ref().map(|m| mb(m.free)),
            vram_total_mb: mem.as_ref().map(|m| mb(m.total)),
            power_w: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
            util_pct: d.utilization_rates().ok().map(|u| u.gpu),
            sm_clock_mhz: d.clock_info(Clock::SM).ok(),
            mem_clock_mhz: d.clock_info(Clock::Memory).ok(),
        };
        if snap.temp_c.is_none() && gpu.temp_c.is_some() {
            snap.temp_c = gpu.temp_c;
            snap.temp_source = Some(self.describe());
        }
        snap.gpu = Some(gpu);
        Ok(())
    }
}

/// Free VRAM on GPU 0 in MB, if NVML can tell (for `n_gpu_layers = "auto"`).
pub fn gpu_free_vram_mb() -> Option<u64> {
    let mut snap = Snapshot::default();
    NvmlSensor::open().ok()?.sample(&mut snap).ok()?;
    snap.gpu?.vram_free_mb
}

/// The CPU's temperature file under a sysfs root (`/sys` in production):
/// a CPU hwmon driver's temp1_input, else a CPU-ish thermal zone.
pub fn detect_cpu_sensor(sys: &Path) -> Option<PathBuf> {
    const HWMON: [&str; 5] = [
        "coretemp",
        "k10temp",
        "zenpower",
        "cpu_thermal",
        "soc_thermal",
    ];
    const ZONES: [&str; 5] = ["x86_pkg_temp", "cpu", "soc", "acpitz", "tcpu"];
    let sorted = |dir: PathBuf| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let read = |p: PathBuf| std::fs::read_to_string(p).map(|s| s.trim().to_lowercase());
    for dir in sorted(sys.join("class/hwmon")) {
        if let Ok(name) = read(dir.join("name"))
            && HWMON.contains(&name.as_str())
            && dir.join("temp1_input").is_file()
        {
            return Some(dir.join("temp1_input"));
        }
    }
    for dir in sorted(sys.join("class/thermal")) {
        if let Ok(kind) = read(dir.join("type"))
            && ZONES.iter().any(|z| kind.contains(z))
            && dir.join("temp").is_file()
        {
            return Some(dir.join("temp"));
        }
    }
    None
}

/// The sensors the configuration asks for, in priority order for the temperature.
pub fn sensors(cfg: &config::Monitor) -> Vec<Box<dyn Sensor>> {
    let mut out: Vec<Box<dyn Sensor>> = Vec::new();
    if !cfg.temp_file.is_empty() {
        out.push(Box::new(FileSensor::new(&cfg.temp_file)));
    }
    if cfg.nvml {
        match NvmlSensor::open() {
            Ok(s) => out.push(Box::new(s)),
            Err(e) => log::info!("monitor: no NVIDIA GPU readings (NVML: {e})"),
        }
    }
    if out.is_empty()
        && let Some(path) = detect_cpu_sensor(Path::new("/sys"))
    {
        out.push(Box::new(FileSensor::new(path)));
    }
    out
}

/// Starts the monitor thread; it runs until the process exits.
pub fn spawn(monitor: &config::Monitor, thermal: &config::Thermal) -> std::io::Result<Arc<Shared>> {
    let mut sensors = sensors(monitor);
    match sensors.iter().map(|s| s.describe()).collect::<Vec<_>>() {
        v if v.is_empty() => {
            log::info!(
                "monitor: no temperature sensor found (common in VMs): the thermal throttle is inactive"
            )
        }
        v => log::info!(
            "monitor: sampling {} every {} s; throttle at {} °C, resume at {} °C",
            v.join(", "),
            monitor.interval_s,
            thermal.limit_c,
            thermal.resume_c
        ),
    }
    let shared = Arc::new(Shared::default());
    let out = shared.clone();
    let interval = Duration::from_secs_f64(monitor.interval_s);
    let mut throttle = Throttle::new(thermal.limit_c, thermal.resume_c);
    std::thread::Builder::new()
        .name("monitor".into())
        .spawn(move || {
            let mut failing = vec![false; sensors.len()];
            loop {
                let mut snap = Snapshot::default();
                for (s, failed) in sensors.iter_mut().zip(failing.iter_mut()) {
                    match s.sample(&mut snap) {
                        Ok(()) => *failed = false,
                        Err(e) if !*failed => {
                            log::warn!("monitor: {}: {e}", s.describe());
                            *failed = true;
                        }
                        Err(_) => {}
                    }
                }
                match throttle.update(snap.temp_c) {
                    Some(Change::Throttle) => {
                        log::warn!(
                            "thermal: {:.1} °C at or above the limit: throttling (generation pauses between steps)",
                            snap.temp_c.unwrap_or_default()
                        );
                        shared.throttle_events.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Change::Resume) => log::info!(
                        "thermal: {:.1} °C: resuming at full speed",
                        snap.temp_c.unwrap_or_default()
                    ),
                    None => {}
                }
                shared
                    .throttled
                    .store(throttle.throttled(), Ordering::Relaxed);
                *shared.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = snap;
                std::thread::sleep(interval);
            }
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperatures_in_degrees_and_millidegrees() {
        assert_eq!(parse_temp("45\n"), Some(45.0));
        assert_eq!(parse_temp(" 85.5 "), Some(85.5));
        assert_eq!(parse_temp("45500\n"), Some(45.5));
        assert_eq!(parse_temp("hot"), None);
        assert_eq!(parse_temp("NaN"), None);
    }

    #[test]
    fn file_sensor_fills_the_temperature_once() {
        let dir = std::env::temp_dir().join(format!("ic-mon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "71000\n").unwrap();
        std::fs::write(&b, "99\n").unwrap();
        let mut snap = Snapshot::default();
        FileSensor::new(&a).sample(&mut snap).unwrap();
        FileSensor::new(&b).sample(&mut snap).unwrap();
        assert_eq!(snap.temp_c, Some(71.0));
        assert!(snap.temp_source.as_deref().unwrap().ends_with("/a"));
        assert!(FileSensor::new(dir.join("none")).sample(&mut snap).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn cpu_sensor_prefers_hwmon_then_a_cpu_thermal_zone() {
        let sys = std::env::temp_dir().join(format!("ic-sys-{}", std::process::id()));
        let zone = |n: &str, kind: &str| {
            let d = sys.join("class/thermal").join(n);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("type"), kind).unwrap();
            std::fs::write(d.join("temp"), "40000").unwrap();
            d.join("temp")
        };
        assert_eq!(detect_cpu_sensor(&sys), None);
        zone("thermal_zone0", "iwlwifi_1\n");
        let pkg = zone("thermal_zone1", "x86_pkg_temp\n");
        assert_eq!(detect_cpu_sensor(&sys), Some(pkg));
        let hw = sys.join("class/hwmon/hwmon3");
        std::fs::create_dir_all(&hw).unwrap();
        std::fs::write(hw.join("name"), "k10temp\n").unwrap();
        std::fs::write(hw.join("temp1_input"), "50000").unwrap();
        assert_eq!(detect_cpu_sensor(&sys), Some(hw.join("temp1_input")));
        std::fs::remove_dir_all(sys).unwrap();
    }
}
