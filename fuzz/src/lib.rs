//! Helpers shared by the fuzz targets: reading choices out of the fuzzer's bytes, and
//! splitting a stream into reads the way a socket might deliver it.

/// Reads small decisions from the front of the input; past its end every answer is 0, so
/// any input is valid and short inputs mean simple cases.
pub struct Choices<'a> {
    data: &'a [u8],
}

impl<'a> Choices<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Choices { data }
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.byte() as usize % n
    }

    pub fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// Up to `n` bytes as they are.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Splits `stream` into pieces whose sizes come from `sizes` (cycled; a 0 means one byte),
/// so that every boundary can fall anywhere in a message.
pub fn split<'a>(stream: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let size = match sizes.get(i % sizes.len().max(1)) {
            // Mostly small reads, sometimes large ones.
            Some(&s) if s >= 0xf0 => ((s as usize - 0xef) * 4096).min(rest.len()),
            Some(&s) => (s as usize).clamp(1, rest.len()),
            None => rest.len(),
        };
        let (head, tail) = rest.split_at(size);
        out.push(head);
        rest = tail;
        i += 1;
    }
    out
}

/// A regular protocol message: tag, length, body.
pub fn message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}
