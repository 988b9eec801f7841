//! The `file` handler (skeleton).
use super::*;
/// Factory for `file` devices.
pub struct FileFactory;
impl HandlerFactory for FileFactory {
    fn subtype(&self) -> &str {
        "file"
    }
    fn needs_backing_fd(&self) -> bool {
        true
    }
    fn open(
        &self,
        _dev: &DeviceConfig,
        _backing: Option<OwnedFd>,
    ) -> Result<Arc<dyn Handler>, HandlerError> {
        Err(HandlerError::NoBacking)
    }
}
