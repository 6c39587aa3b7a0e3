using System.Security.Cryptography;
using NbdServer.Downstairs.Cli;
using NbdServer.Protocol;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Tests;

/// <summary><c>nbd-downstairs compare</c>: verdict, listed extents, exit codes, and that it never changes a region.</summary>
[CancelAfter(30_000)]
public sealed class CompareCommandTests
{
    private const int Bs = 4096;
    private TempDir _dir = null!;

    [SetUp]
    public void SetUp() => _dir = new TempDir();

    [TearDown]
    public void TearDown() => _dir.Dispose();

    private string[] Dirs => [_dir.Sub("a"), _dir.Sub("b"), _dir.Sub("c")];

    /// <summary>Three regions of 4 extents × 16 blocks, each given the same writes and a flush.</summary>
    private void CreateReplicas(Action<Region>? extra = null, int onlyExtraFor = -1)
    {
        string[] dirs = Dirs;
        for (int i = 0; i < dirs.Length; i++)
        {
            using Region r = Region.Create(dirs[i], 4 * 16 * Bs, Bs, 16, preallocate: false);
            Write(r, 3, 5, seed: 1);
            Write(r, 40, 10, seed: 2);
            r.Flush(1, 1);
            if (i == onlyExtraFor)
            {
                extra?.Invoke(r);
            }
        }
    }

    private static void Write(Region r, long first, int count, int seed)
    {
        byte[] data = new byte[count * Bs];
        new Random(seed).NextBytes(data);
        byte[] hashes = new byte[count * 8];
        BlockContext.HashBlocks(data, Bs, hashes);
        r.Write(new BlockRange(first, count), hashes, data, writeId: (ulong)seed);
    }

    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        int code = CompareCommand.Run(args, output, error);
        return (code, output.ToString(), error.ToString());
    }

    private Dictionary<string, string> Snapshot() =>
        Directory.EnumerateFiles(_dir.Path, "*", SearchOption.AllDirectories)
            .ToDictionary(f => f, f => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(f))) + "/" + File.GetLastWriteTimeUtc(f).Ticks);

    [Test]
    public void Replicas_with_the_same_writes_and_flush_are_identical_and_untouched()
    {
        CreateReplicas();
        Dictionary<string, string> before = Snapshot();
        (int code, string output, string error) = Run(Dirs);
        Assert.Multiple(() =>
        {
            Assert.That(code, Is.EqualTo(0), output + error);
            Assert.That(output, Does.Contain("IDENTICAL: 3 regions, 4 extents, 64 blocks"));
            Assert.That(Snapshot(), Is.EqualTo(before), "compare must not change anything on disk");
        });
    }

    [Test]
    public void A_write_missing_on_one_replica_lists_its_extent_data_and_metadata()
    {
        // Region b gets one more write (extent 2) and a second flush: data and flush number differ.
        CreateReplicas(r =>
        {
            Write(r, 33, 2, seed: 9);
            r.Flush(2, 1);
        }, onlyExtraFor: 1);
        (int code, string output, _) = Run(Dirs);
        Assert.Multiple(() =>
        {
            Assert.That(code, Is.EqualTo(1), output);
            Assert.That(output, Does.Contain("DIFFERENT: 1 of 4 extents differ"));
            Assert.That(output, Does.Contain("extent 2 (blocks 32..47)").And.Contain("2 block(s) hold different data (first: block 33)"));
            Assert.That(output, Does.Contain("1/1/clean | 1/2/clean | 1/1/clean"));
            Assert.That(output, Does.Not.Contain("extent 0 ").And.Not.Contain("extent 1 ").And.Not.Contain("extent 3 "));
        });
    }

    [Test]
    public void A_rotten_block_is_reported_even_as_only_a_hash_mismatch()
    {
        CreateReplicas();
        // Flip one byte of block 4 (extent 0, written) in region c.
        string extent0 = RegionLayout.ExtentPath(Dirs[2], 0);
        using (FileStream f = File.Open(extent0, FileMode.Open, FileAccess.ReadWrite))
        {
            f.Position = (4 * Bs) + 100;
            int b = f.ReadByte();
            f.Position--;
            f.WriteByte((byte)(b ^ 0x5A));
        }
        (int code, string output, _) = Run(Dirs);
        Assert.Multiple(() =>
        {
            Assert.That(code, Is.EqualTo(1), output);
            Assert.That(output, Does.Contain("extent 0 ").And.Contain("1 block(s) hold different data (first: block 4)"));
            Assert.That(output, Does.Contain("region 2: 1 block(s) do not match their stored hash (first: block 4)"));
        });
    }

    [Test]
    public void Unwritten_and_zero_written_blocks_are_equal()
    {
        CreateReplicas(r =>
        {
            byte[] zeroes = new byte[Bs];
            byte[] hash = new byte[8];
            BlockContext.HashBlocks(zeroes, Bs, hash);
            r.Write(new BlockRange(60, 1), hash, zeroes, 7);
        }, onlyExtraFor: 0);
        // Region a wrote zeroes to block 60 (extent 3 now dirty there); data equal, metadata not.
        (int code, string output, _) = Run(Dirs);
        Assert.That(code, Is.EqualTo(1), output);
        Assert.That(output, Does.Contain("extent 3 ").And.Contain("1/1/dirty | 1/1/clean | 1/1/clean").And.Not.Contain("different data"));
    }

    [Test]
    public void Geometry_mismatch_is_different_and_a_damaged_or_missing_region_is_exit_2()
    {
        CreateReplicas();
        Region.Create(_dir.Sub("other"), 8 * 16 * Bs, Bs, 16, preallocate: false).Dispose();
        (int code, string output, _) = Run(Dirs[0], _dir.Sub("other"));
        Assert.That((code, output), Is.EqualTo((1, output)));
        Assert.That(output, Does.Contain("geometry differs"));

        (code, _, string error) = Run(Dirs[0], _dir.Sub("nothing-here"));
        Assert.That(code, Is.EqualTo(2));
        Assert.That(error, Does.Contain("region.meta"));

        File.WriteAllBytes(RegionLayout.MetaPath(Dirs[1]), new byte[100]);
        (code, _, error) = Run(Dirs);
        Assert.That(code, Is.EqualTo(2));
        Assert.That(error, Does.Contain("truncated"));

        Assert.That(Run(Dirs[0]).Code, Is.EqualTo(2), "one region is a usage error");
        Assert.That(Run(Dirs[0], Dirs[2], "--bogus").Code, Is.EqualTo(2));
    }

    [Test]
    public void Works_while_a_region_is_held_open_by_a_server()
    {
        CreateReplicas();
        using Region serving = Region.Open(Dirs[0]); // holds region.lock as `run` does
        (int code, string output, string error) = Run(Dirs);
        Assert.That(code, Is.EqualTo(0), output + error);
    }
}
