using Microsoft.Win32.SafeHandles;
using NbdServer.Common.Posix;

namespace NbdServer.Common.Tests;

public sealed class PosixFileTests
{
    private string _path = null!;

    [SetUp]
    public void SetUp() => _path = Path.Combine(Path.GetTempPath(), $"posixfile-{Guid.NewGuid():N}");

    [TearDown]
    public void TearDown() => File.Delete(_path);

    [Test]
    public void Flush_to_disk_succeeds_on_a_regular_file()
    {
        using SafeFileHandle handle = File.OpenHandle(_path, FileMode.CreateNew, FileAccess.ReadWrite);
        RandomAccess.Write(handle, new byte[4096], 0);
        Assert.That(() => PosixFile.FlushToDisk(handle), Throws.Nothing);
        Assert.That(() => PosixFile.FlushToDisk(handle, dataOnly: true), Throws.Nothing);
    }

    [Test]
    public void Flush_to_disk_reports_the_errno_when_fsync_fails()
    {
        // fsync on a pipe fails with EINVAL: the error must surface, not vanish as in .NET's own flush.
        using var pipe = new System.IO.Pipes.AnonymousPipeServerStream();
        var handle = new SafeFileHandle(pipe.SafePipeHandle.DangerousGetHandle(), ownsHandle: false);
        var error = Assert.Throws<PosixIOException>(() => PosixFile.FlushToDisk(handle, path: "pipe"));
        Assert.That(error!.Errno, Is.EqualTo(Errnos.EINVAL));
        Assert.That(error.Message, Does.Contain("fsync 'pipe' failed: EINVAL"));
    }

    [Test]
    public void Punched_holes_read_as_zeroes_and_show_up_to_seek_hole()
    {
        using SafeFileHandle handle = File.OpenHandle(_path, FileMode.CreateNew, FileAccess.ReadWrite);
        byte[] data = new byte[1 << 20];
        Array.Fill(data, (byte)0x5a);
        RandomAccess.Write(handle, data, 0);
        Assume.That(PosixFile.TryPunchHole(handle, 0, 512 * 1024), Is.True, "filesystem without hole punching");
        byte[] back = new byte[4096];
        RandomAccess.Read(handle, back, 4096);
        Assert.That(back, Is.All.EqualTo(0));
        Assert.That(PosixFile.SeekData(handle, 0, 1 << 20), Is.EqualTo(512L * 1024));
        Assert.That(PosixFile.SeekHole(handle, 512 * 1024, 1 << 20), Is.EqualTo(1L << 20));
    }
}
