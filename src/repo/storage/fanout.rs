//! One archive written to several destinations at once: the backup is produced
//! (dumped, compressed, encrypted) once and every byte goes to each destination's
//! upload. A destination that fails is dropped (its upload discarded) and the others
//! go on: one destination down is not every destination down. Only when all have
//! failed does writing fail.

use std::io::{self, Write};

use super::{Place, Upload};

/// Each place with its upload, or the error that ended it.
pub type Finished = Vec<(Place, Result<Box<dyn Upload>, io::Error>)>;

/// The uploads of one archive, one per destination, in the configured order.
pub struct FanOut {
    sinks: Vec<Sink>,
}

struct Sink {
    place: Place,
    upload: Result<Box<dyn Upload>, io::Error>,
}

impl FanOut {
    /// Starts the upload of `name` in each place; a place that refuses is recorded
    /// as failed, not fatal.
    pub fn start(places: &[Place], name: &str) -> Self {
        FanOut {
            sinks: places
                .iter()
                .map(|place| Sink {
                    place: place.clone(),
                    upload: place.store.put(name),
                })
                .collect(),
        }
    }

    /// Each place with its upload, or the error that ended it.
    pub fn finish(self) -> Finished {
        self.sinks
            .into_iter()
            .map(|s| (s.place, s.upload))
            .collect()
    }

    /// Whether any upload is still going.
    pub fn any_alive(&self) -> bool {
        self.sinks.iter().any(|s| s.upload.is_ok())
    }

    /// Why every destination failed: the first error's kind (a full disk stays a
    /// full disk), every destination named.
    fn all_failed(&self) -> io::Error {
        let kind = self
            .sinks
            .iter()
            .find_map(|s| s.upload.as_ref().err().map(io::Error::kind))
            .unwrap_or(io::ErrorKind::Other);
        let reasons: Vec<String> = self
            .sinks
            .iter()
            .filter_map(|s| {
                s.upload
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {e}", s.place.label()))
            })
            .collect();
        io::Error::new(kind, reasons.join("; "))
    }
}

impl Write for FanOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for sink in &mut self.sinks {
            if let Ok(upload) = &mut sink.upload {
                if let Err(e) = upload.write_all(buf) {
                    // Dropping the upload discards what it had written.
                    sink.upload = Err(e);
                }
            }
        }
        if self.any_alive() {
            Ok(buf.len())
        } else {
            Err(self.all_failed())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        for sink in &mut self.sinks {
            if let Ok(upload) = &mut sink.upload {
                if let Err(e) = upload.flush() {
                    sink.upload = Err(e);
                }
            }
        }
        if self.any_alive() {
            Ok(())
        } else {
            Err(self.all_failed())
        }
    }
}
