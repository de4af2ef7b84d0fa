//! [`ImageReadSeek`]: an image's guest bytes (through its backing chain) as a
//! [`std::io::Read`] + [`std::io::Seek`] stream, for code that takes a reader: `io::copy`, a
//! hasher, a partition-table or file-system parser.

use std::borrow::Borrow;
use std::io::{self, Read, Seek, SeekFrom};

use crate::error::Error;
use crate::image::Image;

/// Reads an [`Image`]'s guest bytes as a byte stream: `Read` and `Seek` over the virtual
/// disk (zeros where the image stores none), plus positional [`read_at`](Self::read_at)
/// that leaves the position alone. `I` is the image or anything that borrows one (`&Image`,
/// `Arc<Image>`).
///
/// A read at or past the virtual size returns 0 bytes (end of file); seeking past it is
/// allowed, seeking before 0 is an error. Errors from the image (a corrupt table, a short
/// file) come back as [`io::Error`]s whose inner error is the [`crate::Error`].
///
/// ```
/// use std::io::{Read, Seek, SeekFrom};
/// use vimg::{Image, ImageReadSeek, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.img");
/// # let mut bytes = vec![0u8; 1 << 20];
/// # bytes[510..512].copy_from_slice(&[0x55, 0xaa]);
/// # std::fs::write(&path, &bytes)?;
/// let image = Image::open(&path, &OpenOptions::default())?;
/// let mut disk = ImageReadSeek::new(&image);
/// // The MBR boot signature at the end of the first sector.
/// let mut sig = [0u8; 2];
/// disk.seek(SeekFrom::Start(510))?;
/// disk.read_exact(&mut sig)?;
/// assert_eq!(sig, [0x55, 0xaa]);
/// // Or the whole disk, into anything that takes a reader.
/// disk.rewind()?;
/// let n = std::io::copy(&mut disk, &mut std::io::sink())?;
/// assert_eq!(n, image.virtual_size());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ImageReadSeek<I: Borrow<Image> = Image> {
    image: I,
    pos: u64,
}

impl<I: Borrow<Image>> ImageReadSeek<I> {
    /// A stream over `image`, positioned at 0.
    pub fn new(image: I) -> Self {
        ImageReadSeek { image, pos: 0 }
    }

    /// The image.
    pub fn get_ref(&self) -> &Image {
        self.image.borrow()
    }

    /// Gives the image back.
    pub fn into_inner(self) -> I {
        self.image
    }

    /// The virtual size: the length of the stream.
    pub fn len(&self) -> u64 {
        self.get_ref().virtual_size()
    }

    /// True for an image of zero bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads up to `buf.len()` bytes at guest `offset` without moving the stream's position
    /// (like `FileExt::read_at`): fewer only at the end of the disk, 0 at or past it.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.len();
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let n = (size - offset).min(buf.len() as u64) as usize;
        let image = self.get_ref();
        image
            .read_at(&mut buf[..n], offset)
            .map_err(|e| to_io(e.with_path(image.filename())))?;
        Ok(n)
    }
}

/// An image error as an I/O error: the OS error kind where there is one, else `InvalidData`
/// (the image's content is wrong), with the vimg error inside.
fn to_io(e: Error) -> io::Error {
    let kind = e.io_kind().unwrap_or(io::ErrorKind::InvalidData);
    io::Error::new(kind, e)
}

impl<I: Borrow<Image>> Read for ImageReadSeek<I> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<I: Borrow<Image>> Seek for ImageReadSeek<I> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )),
        }
    }

    fn stream_position(&mut self) -> io::Result<u64> {
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::OpenOptions;
    use std::sync::Arc;

    fn raw_image(bytes: &[u8]) -> (tempfile::TempDir, Image) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        std::fs::write(&p, bytes).unwrap();
        let img = Image::open(&p, &OpenOptions::default()).unwrap();
        (dir, img)
    }

    #[test]
    fn reads_seeks_and_stops_at_the_end() {
        let bytes: Vec<u8> = (0..10_240u32).map(|i| (i * 7 % 251) as u8).collect();
        let (_d, img) = raw_image(&bytes);
        let mut r = ImageReadSeek::new(&img);
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert!(all == bytes, "read {} bytes", all.len());
        assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0);

        assert_eq!(r.seek(SeekFrom::End(-10)).unwrap(), 10_230);
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).unwrap();
        assert!(tail == bytes[10_230..]);

        r.seek(SeekFrom::Start(100)).unwrap();
        assert_eq!(r.seek(SeekFrom::Current(-50)).unwrap(), 50);
        let mut b = [0u8; 4];
        r.read_exact(&mut b).unwrap();
        assert_eq!(b, bytes[50..54]);
        assert_eq!(r.stream_position().unwrap(), 54);

        // Past the end: allowed, reads nothing; before 0: refused, position kept.
        assert_eq!(r.seek(SeekFrom::Start(1 << 40)).unwrap(), 1 << 40);
        assert_eq!(r.read(&mut b).unwrap(), 0);
        r.seek(SeekFrom::Start(3)).unwrap();
        let e = r.seek(SeekFrom::Current(-4)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(r.stream_position().unwrap(), 3);
    }

    #[test]
    fn read_at_is_positional_and_short_only_at_the_end() {
        let bytes = vec![5u8; 4096];
        let (_d, img) = raw_image(&bytes);
        let r = ImageReadSeek::new(Arc::new(img));
        let mut buf = vec![0u8; 100];
        assert_eq!(r.read_at(&mut buf, 4000).unwrap(), 96);
        assert_eq!(r.read_at(&mut buf, 4096).unwrap(), 0);
        assert_eq!(r.read_at(&mut buf, 0).unwrap(), 100);
        assert_eq!((r.len(), r.is_empty()), (4096, false));
    }
}
