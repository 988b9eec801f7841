//! The `ram` handler (skeleton).
use super::*;
/// Factory for `ram` devices.
pub struct RamFactory;
impl HandlerFactory for RamFactory {
    fn subtype(&self) -> &str {
        "ram"
    }
    fn open(
        &self,
        _dev: &DeviceConfig,
        _backing: Option<OwnedFd>,
    ) -> Result<Arc<dyn Handler>, HandlerError> {
        Err(HandlerError::NoBacking)
    }
}
