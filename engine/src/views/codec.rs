//! The byte layout of view checkpoints: length-prefixed fields, little-endian numbers.

use datafusion::common::{DataFusionError, Result};

/// Work that writes part of a checkpoint later, on the thread that stores it.
pub(crate) type Deferred = Box<dyn FnOnce(&mut Writer) + Send>;

/// A piece of a checkpoint that is not yet bytes.
enum Part {
    Bytes(Vec<u8>),
    Deferred(Deferred),
    /// Written with its length first.
    Prefixed(Writer),
}

/// Appends fields to a buffer. Parts may be deferred: the maintainer lays out a
/// checkpoint and leaves the bulk of it (the state maps) to be written by another
/// thread, in [`Writer::finish`].
#[derive(Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
    parts: Vec<Part>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("bytes", &self.buf.len())
            .field("parts", &self.parts.len())
            .finish()
    }
}

impl Writer {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
            parts: Vec::new(),
        }
    }

    fn seal(&mut self) {
        if !self.buf.is_empty() {
            self.parts.push(Part::Bytes(std::mem::take(&mut self.buf)));
        }
    }

    /// Leaves `write` to run at this place when the bytes are made.
    pub(crate) fn defer(&mut self, write: Deferred) {
        self.seal();
        self.parts.push(Part::Deferred(write));
    }

    /// Writes what `body` writes, preceded by its length in bytes.
    pub(crate) fn prefixed(&mut self, body: impl FnOnce(&mut Writer)) {
        self.seal();
        let mut inner = Writer::default();
        body(&mut inner);
        self.parts.push(Part::Prefixed(inner));
    }

    /// The bytes, running every deferred part in order.
    pub(crate) fn finish(mut self, capacity: usize) -> Vec<u8> {
        let mut out = Writer::with_capacity(capacity);
        self.seal();
        self.finish_into(&mut out);
        out.buf
    }

    fn finish_into(self, out: &mut Writer) {
        for part in self.parts {
            match part {
                Part::Bytes(b) => out.buf.extend_from_slice(&b),
                Part::Deferred(write) => write(out),
                Part::Prefixed(inner) => {
                    let at = out.buf.len();
                    out.u64(0);
                    let mut inner = inner;
                    inner.seal();
                    inner.finish_into(out);
                    let len = (out.buf.len() - at - 8) as u64;
                    out.buf[at..at + 8].copy_from_slice(&len.to_le_bytes());
                }
            }
        }
        debug_assert!(self.buf.is_empty());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn i128(&mut self, v: i128) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
    }

    pub(crate) fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
}

/// Reads fields back in the order they were written.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

fn truncated() -> DataFusionError {
    DataFusionError::Execution("view checkpoint is truncated or corrupt".into())
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(truncated());
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.take(N)?.try_into().map_err(|_| truncated())
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    pub(crate) fn i128(&mut self) -> Result<i128> {
        Ok(i128::from_le_bytes(self.array()?))
    }

    pub(crate) fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    pub(crate) fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.rest.len().max(1 << 40))
            .ok_or_else(truncated)
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    pub(crate) fn boxed(&mut self) -> Result<Box<[u8]>> {
        Ok(self.bytes()?.into())
    }

    pub(crate) fn str(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| truncated())
    }

    pub(crate) fn is_done(&self) -> bool {
        self.rest.is_empty()
    }
}
