//! Where the tensors live: CPU (burn `flex`) or, with the `cuda` feature, an NVIDIA GPU.
//!
//! burn's CUDA device panics on first use when no driver can be loaded, so the GPU is only
//! chosen after checking that the NVIDIA kernel driver is present; otherwise mica falls back to
//! the CPU and says so once. `MICA_DEVICE=cpu` forces the CPU on a GPU machine.

use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu (burn flex)",
            DeviceKind::Cuda => "cuda (burn cuda)",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// True when the NVIDIA driver is loaded and a device node exists.
pub fn nvidia_gpu_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
        && std::path::Path::new("/dev/nvidia0").exists()
}

/// Picks the device for this build and machine; `notice` receives one line when a requested
/// or available GPU cannot be used.
pub fn select(notice: &mut dyn FnMut(&str)) -> DeviceKind {
    let forced = std::env::var("MICA_DEVICE").unwrap_or_default().to_ascii_lowercase();
    if forced == "cpu" {
        return DeviceKind::Cpu;
    }
    if cfg!(feature = "cuda") {
        if nvidia_gpu_present() {
            return DeviceKind::Cuda;
        }
        notice("no NVIDIA GPU found (no /proc/driver/nvidia/version or /dev/nvidia0); using the CPU");
        return DeviceKind::Cpu;
    }
    if forced == "cuda" {
        notice("MICA_DEVICE=cuda, but this mica was built without the `cuda` feature; using the CPU");
    }
    DeviceKind::Cpu
}

/// Serialises seeding + parameter initialisation: burn's backend RNG is process-wide, so two
/// models initialised at once in one process (tests, a server) would otherwise interleave
/// their draws and lose reproducibility.
pub(crate) static INIT_LOCK: Mutex<()> = Mutex::new(());
