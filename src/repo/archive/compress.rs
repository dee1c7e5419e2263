//! Compression of the database image: gzip (parallel, multi-member), zstd
//! (multithreaded) or none.
//!
//! gzip has no multithreaded encoder in flate2, so [`ParallelGzip`] cuts the input
//! into 1 MiB blocks, compresses each as a complete gzip member on a small pool of
//! threads and writes the members in order. The concatenation is a valid multi-member
//! gzip stream: `gzip -d` and flate2's `MultiGzDecoder` read it. Memory is bounded by
//! the blocks in flight (two per thread).

use std::collections::VecDeque;
use std::io::{self, BufRead, Read, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::write::GzEncoder;

pub use crate::config::Compression;

/// Bytes per zstd worker job.
const ZSTD_JOB: u32 = 1 << 20;

/// Bytes per gzip member.
const GZIP_BLOCK: usize = 1 << 20;

/// Number of compression threads: one per core.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A compressing writer in front of `W`.
pub enum Encoder<W: Write> {
    Gzip(ParallelGzip<W>),
    Zstd(Box<zstd::stream::write::Encoder<'static, W>>),
    None(W),
}

impl<W: Write + Send> Encoder<W> {
    pub fn new(compression: Compression, level: i32, threads: usize, inner: W) -> io::Result<Self> {
        Ok(match compression {
            Compression::Gzip => Encoder::Gzip(ParallelGzip::new(inner, level, threads)),
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(inner, level)?;
                if threads > 1 {
                    enc.multithread(threads as u32)?;
                    // The default job (4x the window, 8 MiB at level 3) per worker plus
                    // the jobs in flight cost ~50 MiB; 1 MiB jobs keep memory small at
                    // a negligible cost in ratio (jobs overlap their windows).
                    enc.set_parameter(zstd::zstd_safe::CParameter::JobSize(ZSTD_JOB))?;
                }
                Encoder::Zstd(Box::new(enc))
            }
            Compression::None => Encoder::None(inner),
        })
    }

    /// Ends the compressed stream and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(gz) => gz.finish(),
            Encoder::Zstd(z) => z.finish(),
            Encoder::None(w) => Ok(w),
        }
    }
}

impl<W: Write + Send> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(gz) => gz.write(buf),
            Encoder::Zstd(z) => z.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(gz) => gz.flush(),
            Encoder::Zstd(z) => z.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

/// A decompressing reader over `R`.
pub fn decoder<'a, R: BufRead + 'a>(
    compression: Compression,
    input: R,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        // Reads concatenated frames too.
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
        Compression::None => Box::new(input),
    })
}

type Job = (Vec<u8>, SyncSender<io::Result<Vec<u8>>>);

/// Block-parallel gzip writer producing a multi-member stream.
pub struct ParallelGzip<W: Write> {
    inner: W,
    block: Vec<u8>,
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    in_flight: VecDeque<Receiver<io::Result<Vec<u8>>>>,
    max_in_flight: usize,
    wrote_any: bool,
}

impl<W: Write> ParallelGzip<W> {
    pub fn new(inner: W, level: i32, threads: usize) -> Self {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let level = flate2::Compression::new(level.clamp(1, 9) as u32);
        let workers = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    let Ok((block, reply)) = job else { return };
                    let _ = reply.send(gzip_member(&block, level));
                })
            })
            .collect();
        ParallelGzip {
            inner,
            block: Vec::with_capacity(GZIP_BLOCK),
            jobs: Some(tx),
            workers,
            in_flight: VecDeque::new(),
            max_in_flight: threads * 2,
            wrote_any: false,
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(GZIP_BLOCK));
        let (reply, result) = mpsc::sync_channel(1);
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("compressor already finished"))?;
        jobs.send((block, reply))
            .map_err(|_| io::Error::other("compression thread stopped"))?;
        self.in_flight.push_back(result);
        self.wrote_any = true;
        while self.in_flight.len() > self.max_in_flight {
            self.drain_one()?;
        }
        Ok(())
    }

    fn drain_one(&mut self) -> io::Result<()> {
        if let Some(result) = self.in_flight.pop_front() {
            let member = result
                .recv()
                .map_err(|_| io::Error::other("compression thread stopped"))??;
            self.inner.write_all(&member)?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        // Empty input still yields one (empty) member, so the output is valid gzip.
        if !self.block.is_empty() || !self.wrote_any {
            self.submit()?;
        }
        while !self.in_flight.is_empty() {
            self.drain_one()?;
        }
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.inner.flush()?;
        // No Drop impl: dropping without `finish` closes the job channel and the
        // workers exit on their own.
        let ParallelGzip { inner, .. } = self;
        Ok(inner)
    }
}

fn gzip_member(block: &[u8], level: flate2::Compression) -> io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::with_capacity(block.len() / 3 + 64), level);
    enc.write_all(block)?;
    enc.finish()
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            let take = (GZIP_BLOCK - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.block.len() == GZIP_BLOCK {
                self.submit()?;
            }
        }
        Ok(total)
    }

    /// Members are written in order as they complete; a flush does not force a
    /// partial block out (that would only cost ratio).
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| ((i * 7919) % 251) as u8 ^ (i / 1000) as u8)
            .collect()
    }

    #[test]
    fn every_codec_round_trips_including_empty_input() {
        for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
            for n in [0, 10, GZIP_BLOCK, 3 * GZIP_BLOCK + 17] {
                let data = sample(n);
                let mut enc = Encoder::new(c, c.default_level(), 2, Vec::new()).unwrap();
                for chunk in data.chunks(65_536 + 3) {
                    enc.write_all(chunk).unwrap();
                }
                let packed = enc.finish().unwrap();
                let mut out = Vec::new();
                decoder(c, &packed[..])
                    .unwrap()
                    .read_to_end(&mut out)
                    .unwrap();
                assert_eq!(out, data, "{c:?} with {n} bytes");
            }
        }
    }

    #[test]
    fn parallel_gzip_is_read_by_gzip_itself() {
        let data = sample(2 * GZIP_BLOCK + 5);
        let mut gz = ParallelGzip::new(Vec::new(), 6, 2);
        gz.write_all(&data).unwrap();
        let packed = gz.finish().unwrap();
        let mut child = std::process::Command::new("gzip")
            .args(["-dc"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(&packed));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, data);
    }
}
