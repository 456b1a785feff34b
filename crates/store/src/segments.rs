//! Reading a file's data runs back to back: the content of a sparse file's blob.

use std::io::{self, Read, Seek, SeekFrom};

use vdsync_proto::EntryKind;

/// Reads a file's data runs back to back: the blob of a sparse file.
pub struct SegmentReader<F> {
    file: F,
    runs: Vec<(u64, u64)>,
    run: usize,
    done_in_run: u64,
}

impl<F: Read + Seek> SegmentReader<F> {
    pub fn new(file: F, segments: Option<&[(u64, u64)]>, size: u64) -> Self {
        let runs = match segments {
            Some(segments) => segments.to_vec(),
            None => vec![(0, size)],
        };
        SegmentReader {
            file,
            runs,
            run: 0,
            done_in_run: 0,
        }
    }

    pub fn from_entry(file: F, kind: &EntryKind) -> Self {
        match kind {
            EntryKind::File { size, segments, .. } => {
                let runs: Option<Vec<(u64, u64)>> = segments
                    .as_ref()
                    .map(|s| s.iter().map(|s| (s.offset, s.len)).collect());
                SegmentReader::new(file, runs.as_deref(), *size)
            }
            _ => SegmentReader::new(file, Some(&[]), 0),
        }
    }
}

impl<F: Read + Seek> Read for SegmentReader<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(&(offset, len)) = self.runs.get(self.run) {
            if self.done_in_run == len {
                self.run += 1;
                self.done_in_run = 0;
                continue;
            }
            if self.done_in_run == 0 {
                self.file.seek(SeekFrom::Start(offset))?;
            }
            let want = usize::try_from(len - self.done_in_run)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let n = self.file.read(&mut buf[..want])?;
            if n == 0 {
                // The file shrank under us; the hash check downstream fails loudly.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while it was read",
                ));
            }
            self.done_in_run += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}
