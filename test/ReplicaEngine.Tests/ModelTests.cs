using System.Diagnostics;
using System.Globalization;
using System.Text;
using NbdServer.Common.Volumes;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>
/// Random guest operations against the engine and against a plain byte array (the model), with one
/// replica at a time made to fail in some way and come back. Judged by outward behaviour only: every
/// read equals the model, no guest operation fails while two replicas are healthy, and whenever the
/// run settles the three replicas hold identical blocks, hashes and metadata, equal to the model.
/// CI runs <see cref="CiSteps"/> steps; <c>scripts/model.sh STEPS [SEED]</c> runs more. Every run
/// prints its seed; <see cref="SeedVariable"/> replays the same operations and faults in the same
/// order (the interleaving with the engine's own threads still varies).
/// </summary>
[CancelAfter(MaxMinutes * 60_000)]
public sealed class ModelTests
{
    public const string SeedVariable = "NBD_MODEL_SEED";
    public const string StepsVariable = "NBD_MODEL_STEPS";

    /// <summary>Comma-separated fault kinds to inject (default all), e.g. to look past a known bug.</summary>
    public const string FaultsVariable = "NBD_MODEL_FAULTS";

    /// <summary>Steps in a CI run: 3.5 to 6.5 s on a 2-CPU machine with other builds running.</summary>
    private const int CiSteps = 3000;

    /// <summary>Upper bound on steps whatever the variable says (model.sh refuses more).</summary>
    private const int MaxSteps = 1_000_000;

    /// <summary>Longest run [CancelAfter] allows; a run's own deadline is derived from its steps, below this.</summary>
    private const int MaxMinutes = 240;

    /// <summary>A run settles (all faults healed, replicas compared with the model) every this many steps.</summary>
    private const int SettleEvery = 400;

    /// <summary>Settles in a row before a replica that keeps faulting with no fault injected fails the run.</summary>
    private const int MaxSettleRounds = 5;

    /// <summary>Most guest operations in flight at once (on disjoint byte ranges, so the model stays exact).</summary>
    private const int MaxBatch = 4;

    /// <summary>Longest guest read or write: a little more than two extents, so some cross extents.</summary>
    private const int MaxIoBytes = (2 * Cluster.ExtentBytes) + 700;

    /// <summary>Upper bound of one settle or one wait for the replicas to be all in service again.</summary>
    private static readonly TimeSpan SettleLimit = TimeSpan.FromSeconds(20);

    private enum Fault
    {
        None,
        /// <summary>The connection is cut; the engine reconnects at once.</summary>
        Disconnect,
        /// <summary>The process is gone: connection cut, reconnects refused until it heals.</summary>
        Down,
        /// <summary>Every write answers EIO (a failing disk) until it heals.</summary>
        WriteErrors,
        /// <summary>Every flush answers ENOSPC until it heals.</summary>
        FlushErrors,
        /// <summary>A few blocks rot (data changes, stored hash does not); healed by a scrub.</summary>
        Rot,
        /// <summary>Every request takes a few milliseconds (a slow disk).</summary>
        Slow,
        /// <summary>Nothing is answered until it heals (a stuck disk); the others carry on.</summary>
        Stuck,
    }

    [Test]
    [Category("Model")]
    public async Task Random_guest_io_with_one_replica_failing_at_a_time_always_reads_the_model_and_replicas_converge()
    {
        int seed = int.TryParse(Environment.GetEnvironmentVariable(SeedVariable), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out int s) ? s : Random.Shared.Next();
        int steps = int.TryParse(Environment.GetEnvironmentVariable(StepsVariable), NumberStyles.None, CultureInfo.InvariantCulture, out int n) && n > 0 ? Math.Min(n, MaxSteps) : CiSteps;
        Fault[] faults = Environment.GetEnvironmentVariable(FaultsVariable) is { Length: > 0 } list
            ? [.. list.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries).Select(Enum.Parse<Fault>)]
            : [.. Enum.GetValues<Fault>().Where(f => f != Fault.None)];
        TestContext.Out.WriteLine($"model seed {seed}, {steps} steps, faults {string.Join(",", faults)} (replay: {SeedVariable}={seed} {StepsVariable}={steps})");

        await using var cluster = new Cluster();
        await cluster.StartAsync(Cluster.Options() with
        {
            // A read sent to a stuck replica moves on to another soon; the default (1 s) would make
            // the Stuck fault cost a second per read that lands there.
            ReadAttemptTimeout = TimeSpan.FromMilliseconds(250),
            ScrubInterval = TimeSpan.Zero,
        });
        // A real client's token only ends a wait for a send slot; once a request is queued it ends
        // with its reply or the connection. Each replica here is one or the other, by the seed.
        var config = new Random(seed ^ 0x5EED);
        foreach (FakeReplica replica in cluster.Replicas)
        {
            replica.IgnoreCancellation = config.Next(2) == 0;
        }
        var run = new ModelRun(cluster, seed, steps, faults);
        var clock = Stopwatch.StartNew();
        await run.RunAsync();
        TestContext.Out.WriteLine($"{steps} steps in {clock.Elapsed.TotalSeconds:0.0} s: {run.Summary()}");
    }

    /// <summary>One run: the random source, the model, the current fault and the counters.</summary>
    private sealed class ModelRun(Cluster cluster, int seed, int steps, Fault[] faults)
    {
        private readonly Random _rng = new(seed);
        private readonly long _size = (long)Cluster.ExtentBytes * Cluster.ExtentCount;
        private readonly byte[] _model = new byte[Cluster.ExtentBytes * Cluster.ExtentCount];

        /// <summary>Bytes whose content the volume may choose (trimmed and not written since).</summary>
        private readonly bool[] _loose = new bool[Cluster.ExtentBytes * Cluster.ExtentCount];

        /// <summary>The step that last set each byte (for a failure message that says where to look).</summary>
        private readonly int[] _writtenAt = new int[Cluster.ExtentBytes * Cluster.ExtentCount];

        private readonly Dictionary<string, int> _counts = [];

        /// <summary>What each recent step did (guest ops and faults), for failure messages.</summary>
        private readonly System.Collections.Concurrent.ConcurrentQueue<string> _history = new();
        /// <summary>A minute plus 50 ms a step (a step takes about 1.5 ms), within the [CancelAfter] bound.</summary>
        private readonly TimeSpan _deadline = TimeSpan.FromSeconds(Math.Min(60 + (steps * 0.05), (MaxMinutes - 1) * 60));
        private readonly Stopwatch _clock = Stopwatch.StartNew();
        private Fault _fault;
        private int _victim;
        private int _faultStepsLeft;
        private int _step;

        public async Task RunAsync()
        {
            for (_step = 1; _step <= steps; _step++)
            {
                if (_clock.Elapsed > _deadline)
                {
                    Assert.Fail($"{Where()}: the run passed its deadline of {_deadline.TotalSeconds:0} s");
                }
                await StepFaultsAsync();
                await RunBatchAsync();
                if (_step % SettleEvery == 0)
                {
                    await SettleAndCompareAsync();
                }
            }
            await SettleAndCompareAsync();
        }

        public string Summary() => string.Join(", ", _counts.OrderBy(c => c.Key, StringComparer.Ordinal).Select(c => $"{c.Key} {c.Value}"));

        private string Where() => $"seed {seed}, step {_step} (replay: {SeedVariable}={seed} {StepsVariable}={steps}); fault now: {_fault}{(_fault == Fault.None ? "" : $" on replica {_victim}")}";

        private void Count(string what) => _counts[what] = _counts.GetValueOrDefault(what) + 1;

        private void Note(string what)
        {
            _history.Enqueue($"step {_step}: {what}");
            while (_history.Count > 60 && _history.TryDequeue(out _))
            {
            }
        }

        // ------------------------------------------------------------ faults

        private async Task StepFaultsAsync()
        {
            // Every draw is made whatever the state, so one seed gives the same sequence of decisions.
            double roll = _rng.NextDouble();
            int victim = _rng.Next(3);
            Fault kind = faults.Length == 0 ? Fault.None : faults[_rng.Next(faults.Length)];
            int duration = _rng.Next(1, 40);
            if (_fault != Fault.None)
            {
                if (--_faultStepsLeft <= 0)
                {
                    await HealAsync();
                }
                return;
            }
            if (roll >= 0.03 || kind == Fault.None)
            {
                return;
            }
            // Never a second replica out: the previous one must be back in service (repaired) first.
            await Cluster.WaitUntilAsync(() => cluster.Volume.GetStatus().Replicas.All(r => r.State == ReplicaState.Active),
                $"all three replicas are active before the next fault ({Where()})", SettleLimit);
            _fault = kind;
            _victim = victim;
            _faultStepsLeft = duration;
            Count($"fault {kind}");
            Note($"fault {kind} on replica {victim} for {duration} steps");
            FakeReplica replica = cluster.Replicas[victim];
            switch (kind)
            {
                case Fault.Disconnect:
                    replica.DropConnection();
                    break;
                case Fault.Down:
                    replica.Reachable = false;
                    replica.DropConnection();
                    break;
                case Fault.WriteErrors:
                    replica.FailWritesWith = ResultCode.IoError;
                    break;
                case Fault.FlushErrors:
                    replica.FailFlushesWith = ResultCode.NoSpace;
                    break;
                case Fault.Rot:
                    for (int i = _rng.Next(1, 4); i > 0; i--)
                    {
                        replica.CorruptBlock(_rng.NextInt64(_size / Cluster.BlockSize));
                    }
                    break;
                case Fault.Slow:
                    replica.OpDelay = TimeSpan.FromMilliseconds(2);
                    break;
                case Fault.Stuck:
                    replica.Hold();
                    break;
            }
        }

        private async Task HealAsync()
        {
            FakeReplica replica = cluster.Replicas[_victim];
            Fault healed = _fault;
            Note($"heal {healed} on replica {_victim}");
            _fault = Fault.None;
            replica.Reachable = true;
            replica.FailWritesWith = null;
            replica.FailFlushesWith = null;
            replica.OpDelay = TimeSpan.Zero;
            replica.Release();
            if (healed == Fault.Rot)
            {
                // Rot no read touched stays until something looks: the scrub is that something. It
                // must finish before another replica may fail, or two copies could be bad at once.
                await WaitAllActiveAsync();
                await cluster.Volume.StartScrub().WaitAsync(SettleLimit);
                Assert.That(cluster.Volume.Scrub.Problem, Is.Null, $"the scrub after rot ({Where()})");
            }
        }

        private Task WaitAllActiveAsync() =>
            Cluster.WaitUntilAsync(() => cluster.Volume.GetStatus().Replicas.All(r => r.State == ReplicaState.Active),
                $"all three replicas are active ({Where()})", SettleLimit);

        // ------------------------------------------------------------ guest operations

        private async Task RunBatchAsync()
        {
            int count = _rng.Next(1, MaxBatch + 1);
            var taken = new List<(long First, long End)>();
            var ops = new List<(string Name, Task Task)>();
            for (int i = 0; i < count; i++)
            {
                (string name, long offset, int length) = PickOp();
                if (length > 0 && taken.Exists(t => t.First < offset + length && offset < t.End))
                {
                    continue; // overlapping ops in flight together have no single right answer; skip it
                }
                taken.Add((offset, offset + length));
                ops.Add((name, RunOpAsync(name, offset, length)));
            }
            foreach ((string name, Task task) in ops)
            {
                if (!await Cluster.CompletesWithinAsync(task, Cluster.Patience))
                {
                    Assert.Fail($"{Where()}: a guest {name} did not finish within {Cluster.Patience.TotalSeconds:0} s; engine: {Describe()}");
                }
                await task; // rethrows its assertion or the engine's error
            }
        }

        private (string Name, long Offset, int Length) PickOp()
        {
            int which = _rng.Next(100);
            string name = which switch
            {
                < 42 => "write",
                < 76 => "read",
                < 80 => "cancelled read",
                < 88 => "flush",
                < 94 => "write-zeroes",
                _ => "trim",
            };
            if (name == "flush")
            {
                return (name, 0, 0);
            }
            long offset;
            int length;
            if (_rng.Next(2) == 0)
            {
                // Whole blocks: the engine's direct path.
                int blocks = _rng.Next(1, (MaxIoBytes / Cluster.BlockSize) + 1);
                offset = _rng.NextInt64((_size / Cluster.BlockSize) - blocks + 1) * Cluster.BlockSize;
                length = blocks * Cluster.BlockSize;
            }
            else
            {
                // Any bytes: partial blocks are read-modify-written.
                length = _rng.Next(2) == 0 ? _rng.Next(1, 64) : _rng.Next(1, MaxIoBytes + 1);
                offset = _rng.NextInt64(_size - length + 1);
            }
            return (name, offset, length);
        }

        private async Task RunOpAsync(string name, long offset, int length)
        {
            int step = _step;
            Count(name);
            Note(length == 0 ? name : $"{name} of bytes {offset}+{length} (blocks {offset / Cluster.BlockSize}..{(offset + length - 1) / Cluster.BlockSize})");
            using var cts = new CancellationTokenSource(Cluster.Patience);
            try
            {
                switch (name)
                {
                    case "write":
                        {
                            byte[] data = new byte[length];
                            _rng.NextBytes(data);
                            // Unique to this step, so a stale or misplaced copy of an older write never passes.
                            byte[] tag = Encoding.ASCII.GetBytes($"s{step};");
                            tag.AsSpan(0, Math.Min(length, tag.Length)).CopyTo(data);
                            var options = _rng.Next(8) == 0 ? WriteOptions.ForceUnitAccess : WriteOptions.None;
                            await cluster.Volume.WriteAsync(offset, data, options, cts.Token);
                            Apply(offset, data, step);
                            break;
                        }
                    case "write-zeroes":
                        await cluster.Volume.WriteZeroesAsync(offset, length, WriteOptions.None, cts.Token);
                        Apply(offset, new byte[length], step);
                        break;
                    case "trim":
                        await cluster.Volume.TrimAsync(offset, length, WriteOptions.None, cts.Token);
                        // NBD leaves trimmed bytes undefined; the replicas must still agree on them.
                        _loose.AsSpan((int)offset, length).Fill(true);
                        break;
                    case "flush":
                        await cluster.Volume.FlushAsync(cts.Token);
                        break;
                    case "cancelled read":
                        {
                            // The guest gives up on a read (its connection closed) at a random moment:
                            // whatever the engine was doing for it (a retry, a read repair) must leave
                            // nothing wrong behind. If the read still finishes, its data must be right.
                            byte[] data = new byte[length];
                            cts.CancelAfter(TimeSpan.FromMilliseconds(_rng.Next(0, 3)));
                            try
                            {
                                await cluster.Volume.ReadAsync(offset, data, cts.Token);
                            }
                            catch (OperationCanceledException)
                            {
                                break;
                            }
                            CheckAgainstModel(data, offset, $"guest read of bytes {offset}+{length} (cancelled late)");
                            break;
                        }
                    case "read":
                        {
                            byte[] data = new byte[length];
                            await cluster.Volume.ReadAsync(offset, data, cts.Token);
                            CheckAgainstModel(data, offset, $"guest read of bytes {offset}+{length}");
                            break;
                        }
                }
            }
            catch (VolumeException e)
            {
                Assert.Fail($"{Where()}: a guest {name} of bytes {offset}+{length} failed with two or more replicas healthy: {e.Message}; engine: {Describe()}");
            }
        }

        private void Apply(long offset, byte[] data, int step)
        {
            data.CopyTo(_model.AsSpan((int)offset));
            _loose.AsSpan((int)offset, data.Length).Clear();
            _writtenAt.AsSpan((int)offset, data.Length).Fill(step);
        }

        private void CheckAgainstModel(ReadOnlySpan<byte> data, long offset, string what)
        {
            for (int i = 0; i < data.Length; i++)
            {
                long at = offset + i;
                if (!_loose[at] && data[i] != _model[at])
                {
                    DumpDiagnostics(at / Cluster.BlockSize);
                    Assert.Fail($"{Where()}: {what}: byte {at} (block {at / Cluster.BlockSize}) is {data[i]}, the model says {_model[at]} "
                        + $"(last set at step {_writtenAt[at]}); engine: {Describe()}");
                }
            }
        }

        // ------------------------------------------------------------ settling

        private async Task SettleAndCompareAsync()
        {
            Count("settle");
            if (_fault != Fault.None)
            {
                await HealAsync();
            }
            // A replica may still fault after the others look settled (an answer to a request sent
            // while its fault was on arrives late): then it must come back and be repaired first.
            for (int round = 1; ; round++)
            {
                await WaitAllActiveAsync();
                using (var cts = new CancellationTokenSource(Cluster.Patience))
                {
                    await cluster.Volume.FlushAsync(cts.Token);
                }
                await Cluster.WaitUntilAsync(() => cluster.Volume.GetStatus().Replicas.All(r => r.OutstandingJobs == 0),
                    $"no replica has work outstanding ({Where()}; engine: {Describe()})", SettleLimit);
                if (cluster.Volume.GetStatus().Replicas.All(r => r.State == ReplicaState.Active))
                {
                    break;
                }
                Count("settle again");
                Note($"settle again: {Describe()}");
                if (round == MaxSettleRounds)
                {
                    Assert.Fail($"{Where()}: the replicas did not stay in service through {MaxSettleRounds} settles; engine: {Describe()}");
                }
            }

            for (int r = 0; r < 3; r++)
            {
                (byte[] data, ulong[] hashes, _) = cluster.Replicas[r].Snapshot();
                CheckAgainstModel(data, 0, $"replica {r}'s stored blocks after settling");
                for (int b = 0; b < hashes.Length; b++)
                {
                    if (!BlockContext.Verify(data.AsSpan(b * Cluster.BlockSize, Cluster.BlockSize), hashes[b]))
                    {
                        Assert.Fail($"{Where()}: replica {r} stores block {b} with a hash that does not match its data after settling");
                    }
                }
            }
            cluster.AssertReplicasIdentical(includeMeta: false);
            // Same blocks must also carry the same (generation, flush number) once flushed: a replica
            // recorded as older than the others is what reconciliation and live repair judge by.
            var metas = cluster.Replicas.Select(r => r.Snapshot().Meta).ToArray();
            var differing = Enumerable.Range(0, Cluster.ExtentCount)
                .Where(e => !metas[1][e].Equals(metas[0][e]) || !metas[2][e].Equals(metas[0][e]))
                .Select(e => $"extent {e}: {string.Join(" / ", metas.Select(m => $"gen {m[e].Generation} flush {m[e].FlushNumber}{(m[e].Dirty ? " dirty" : "")}"))}")
                .ToList();
            if (differing.Count > 0)
            {
                DumpDiagnostics(block: null);
                Assert.Fail($"{Where()}: after settling, the replicas hold the same blocks but different extent metadata "
                    + $"(replica 0 / 1 / 2): {string.Join("; ", differing)}");
            }
        }

        /// <summary>Prints the recent steps, every replica's copy of the block and the engine's log tail.</summary>
        private void DumpDiagnostics(long? block)
        {
            TestContext.Out.WriteLine($"recent steps (seed {seed}):");
            foreach (string line in _history)
            {
                TestContext.Out.WriteLine($"  {line}");
            }
            if (block is { } b)
            {
                DumpBlock(b);
            }
            TestContext.Out.WriteLine("engine log, last 40 lines:");
            foreach ((var level, string message) in cluster.Log.Lines.TakeLast(40))
            {
                TestContext.Out.WriteLine($"  {level}: {message}");
            }
        }

        private void DumpBlock(long block)
        {
            byte[] expected = _model.AsSpan((int)(block * Cluster.BlockSize), Cluster.BlockSize).ToArray();
            for (int r = 0; r < 3; r++)
            {
                (byte[] data, ulong[] hashes, _) = cluster.Replicas[r].Snapshot();
                ReadOnlySpan<byte> copy = data.AsSpan((int)(block * Cluster.BlockSize), Cluster.BlockSize);
                TestContext.Out.WriteLine($"replica {r} block {block}: {(copy.SequenceEqual(expected) ? "equals the model" : "DIFFERS from the model")}, "
                    + $"stored hash {(BlockContext.Verify(copy, hashes[block]) ? "matches" : "does not match")} its data");
            }
        }

        private string Describe() =>
            string.Join("; ", cluster.Volume.GetStatus().Replicas.Select(r => $"replica {r.Index} {r.State}, {r.OutstandingJobs} jobs, {r.Faults} faults (last: {r.LastFault ?? "none"})"));
    }
}
