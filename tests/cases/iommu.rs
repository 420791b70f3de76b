//! `--iommu` with a stock Linux guest: the kernel finds the VT-d unit in the DMAR table,
//! turns on interrupt remapping (and with `intel_iommu=on` DMA remapping), and every MSI-X
//! vector of the virtio devices a command run uses (virtio-fs, vsock) and the serial line
//! go through the remapping table; the command's output coming back over vsock shows they
//! are delivered.

use std::time::Duration;

use super::status;
use crate::harness::{expect_output, Case, CaseOutput};

const SCRIPT: &str = r#"
"$FERROVM" run --kernel "$IMAGES/bzImage" --iommu --cpus 2 --memory 256M \
    --cmdline "console=ttyS0 panic=-1 reboot=k intel_iommu=on" -- \
    sh -c 'dmesg | grep -e DMAR -e remapping; grep -e IR- /proc/interrupts; echo GUEST_DONE' \
    >out 2>err
echo "STATUS_IOMMU=$?"
sed 's/^/OUT /' out | head -60
sed 's/^/ERR /' err | head -20
"#;

fn check(o: &CaseOutput) -> Result<(), String> {
    status(o, "STATUS_IOMMU", 0)?;
    for m in [
        "OUT GUEST_DONE",
        "Enabled IRQ remapping in xapic mode",
        "IR-PCI-MSI",
        "IR-IO-APIC",
    ] {
        expect_output(o, m)?;
    }
    if o.output.contains("DMAR: DRHD: handling fault") {
        return Err("the guest saw a DMA remapping fault".into());
    }
    Ok(())
}

pub fn cases() -> Vec<Case> {
    vec![Case::new("iommu_linux_remaps_interrupts", SCRIPT)
        .timeout(Duration::from_secs(300))
        .check(check)]
}
