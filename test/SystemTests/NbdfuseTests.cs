using System.Diagnostics;

namespace NbdServer.SystemTests;

/// <summary>
/// A real filesystem on the export: nbdfuse exposes it as a file, a loop device turns that into a
/// block device, and the kernel's ext4 does its own mix of small, large, metadata and flush I/O.
/// Needs root, /dev/fuse and loop devices. TearDown unwinds whatever was set up, with bounded waits.
/// </summary>
[TestFixture]
[CancelAfter(180_000)]
public sealed class NbdfuseTests
{
    private const string Nbdfuse = "/usr/bin/nbdfuse";
    private const string Losetup = "/usr/sbin/losetup";
    private const string MkfsExt4 = "/usr/sbin/mkfs.ext4";
    private const string E2fsck = "/usr/sbin/e2fsck";
    private const string Mount = "/usr/bin/mount";
    private const string Umount = "/usr/bin/umount";
    private const string Fusermount = "/usr/bin/fusermount3";
    private static readonly TimeSpan StepTimeout = TimeSpan.FromSeconds(60);
    private static readonly TimeSpan CleanupTimeout = TimeSpan.FromSeconds(15);

    private ScratchDirectory? _scratch;
    private NbdServerProcess? _server;
    private string? _mountedAt;
    private string? _loopDevice;
    private (Process Process, string Directory)? _fuse;

    [TearDown]
    public async Task TearDownAsync()
    {
        // Undo whatever is still set up, innermost first; every step is bounded and none stops the rest.
        if (_mountedAt is not null)
        {
            await CleanupStepAsync(Umount, "-l", _mountedAt);
            _mountedAt = null;
        }
        if (_loopDevice is not null)
        {
            await CleanupStepAsync(Losetup, "-d", _loopDevice);
            _loopDevice = null;
        }
        await StopFuseAsync(lazy: true);
        _server?.Dispose();
        _server = null;
        _scratch?.Dispose();
        _scratch = null;
    }

    private static async Task CleanupStepAsync(string tool, params string[] args)
    {
        try
        {
            ExternalTool.Result result = await RealClient.RunAsync(tool, args, CleanupTimeout);
            if (result.ExitCode != 0)
            {
                await TestContext.Out.WriteLineAsync($"cleanup: {tool} {string.Join(' ', args)}: {result}");
            }
        }
        catch (Exception e) when (e is TimeoutException or InvalidOperationException or System.ComponentModel.Win32Exception)
        {
            await TestContext.Out.WriteLineAsync($"cleanup: {tool} {string.Join(' ', args)}: {e.Message}");
        }
    }

    private async Task StopFuseAsync(bool lazy)
    {
        if (_fuse is not (Process process, string directory))
        {
            return;
        }
        _fuse = null;
        if (lazy)
        {
            await CleanupStepAsync(Fusermount, "-u", "-z", directory);
        }
        else
        {
            await RunStepAsync(Fusermount, "-u", directory);
        }
        if (!await RealClient.WaitUntilAsync(() => process.HasExited, TimeSpan.FromSeconds(10)))
        {
            process.Kill(entireProcessTree: true);
            process.WaitForExit(5000);
        }
        process.Dispose();
    }

    [Test]
    public async Task Ext4_on_nbdfuse_and_a_loop_device_keeps_files_intact_and_fsck_clean()
    {
        RealClient.Require(Nbdfuse, "libnbd-bin (nbdfuse)");
        RealClient.Require(Fusermount, "fuse3");
        RealClient.Require(Losetup, "mount");
        RealClient.Require(MkfsExt4, "e2fsprogs");
        RealClient.Require(E2fsck, "e2fsprogs");
        Assert.That(File.Exists("/dev/fuse"), Is.True, "/dev/fuse is missing: nbdfuse cannot mount");

        _scratch = new ScratchDirectory("nbdfuse");
        _server = await NbdServerProcess.StartAsync("--memory", "256M");
        string fuseDir = Directory.CreateDirectory(_scratch.File("fuse")).FullName;
        string mountPoint = Directory.CreateDirectory(_scratch.File("mnt")).FullName;

        // 1. Make a filesystem and fill it with files of known content.
        string loop = await AttachAsync(fuseDir, readOnly: false);
        await RunStepAsync(MkfsExt4, "-q", "-F", "-E", "nodiscard", loop);
        await MountAsync(loop, mountPoint, readOnly: false);
        var expected = new Dictionary<string, string>();
        var random = new Random(2024);
        int[] sizes = [0, 1, 4095, 4096, 65537, 1 << 20, (7 << 20) + 123, 24 << 20];
        Directory.CreateDirectory(Path.Combine(mountPoint, "dir", "nested"));
        for (int i = 0; i < sizes.Length; i++)
        {
            byte[] content = new byte[sizes[i]];
            random.NextBytes(content);
            string relative = Path.Combine(i % 2 == 0 ? "dir" : Path.Combine("dir", "nested"), $"file{i}.bin");
            await File.WriteAllBytesAsync(Path.Combine(mountPoint, relative), content);
            expected[relative] = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(content));
        }
        await RunStepAsync("/usr/bin/sync", "-f", mountPoint);
        await UnmountAsync(mountPoint);
        await DetachAsync(loop);

        // 2. Fresh client stack (no cache survives): the filesystem is clean and every file intact.
        string again = await AttachAsync(fuseDir, readOnly: true);
        ExternalTool.Result fsck = await RealClient.RunAsync(E2fsck, ["-f", "-n", again], StepTimeout);
        Assert.That(fsck.ExitCode, Is.EqualTo(0), $"e2fsck -fn found problems:\n{fsck}");
        await MountAsync(again, mountPoint, readOnly: true);
        var actual = new Dictionary<string, string>();
        foreach (string relative in expected.Keys)
        {
            actual[relative] = RealClient.Sha256(Path.Combine(mountPoint, relative));
        }
        await UnmountAsync(mountPoint);
        await DetachAsync(again);

        Assert.That(actual, Is.EqualTo(expected));
        Assert.That(_server.Log, Does.Not.Contain("unexpected failure"));
    }

    /// <summary>Runs nbdfuse on <paramref name="fuseDir"/> and a loop device on its file; returns the device.</summary>
    private async Task<string> AttachAsync(string fuseDir, bool readOnly)
    {
        string[] args = readOnly ? ["-r", fuseDir, _server!.Uri()] : [fuseDir, _server!.Uri()];
        Process nbdfuse = RealClient.Start(Nbdfuse, args);
        _fuse = (nbdfuse, fuseDir);
        string exported = Path.Combine(fuseDir, "nbd");
        bool appeared = await RealClient.WaitUntilAsync(() => File.Exists(exported) || nbdfuse.HasExited, TimeSpan.FromSeconds(20));
        Assert.That(appeared && !nbdfuse.HasExited, Is.True, $"nbdfuse did not expose {exported}");
        Assert.That(new FileInfo(exported).Length, Is.EqualTo(256L << 20));

        ExternalTool.Result losetup = await RunStepAsync(Losetup, readOnly ? ["-r", "-f", "--show", exported] : ["-f", "--show", exported]);
        string device = losetup.Output.Trim();
        Assert.That(device, Does.StartWith("/dev/loop"), losetup.ToString());
        _loopDevice = device;
        return device;
    }

    /// <summary>Detaches the loop device, then unmounts nbdfuse (which flushes and disconnects).</summary>
    private async Task DetachAsync(string device)
    {
        await RunStepAsync(Losetup, "-d", device);
        _loopDevice = null;
        await StopFuseAsync(lazy: false);
    }

    private async Task MountAsync(string device, string mountPoint, bool readOnly)
    {
        await RunStepAsync(Mount, readOnly ? ["-o", "ro", device, mountPoint] : [device, mountPoint]);
        _mountedAt = mountPoint;
    }

    private async Task UnmountAsync(string mountPoint)
    {
        await RunStepAsync(Umount, mountPoint);
        _mountedAt = null;
    }

    private static async Task<ExternalTool.Result> RunStepAsync(string tool, params string[] args)
    {
        ExternalTool.Result result = await RealClient.RunAsync(tool, args, StepTimeout);
        Assert.That(result.ExitCode, Is.EqualTo(0), $"{tool} {string.Join(' ', args)}\n{result}");
        return result;
    }
}
