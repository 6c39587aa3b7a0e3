using NbdServer.Common.Logging;
using NbdServer.Downstairs.Server;

namespace NbdServer.Downstairs.Tests;

[CancelAfter(30_000)]
public sealed class JobSchedulerTests
{
    private sealed class TestJob(long first, long end, Action work, JobAccess access = JobAccess.Write) : IoJob
    {
        public override long FirstBlock => first;

        public override long EndBlock => end;

        public override JobAccess Access => access;

        public override bool MayRunInline => access != JobAccess.Barrier;

        public override void Execute() => work();
    }

    [Test]
    public void Ready_jobs_of_a_batch_are_handed_back_to_run_inline_and_the_rest_wait_their_turn()
    {
        using var scheduler = new JobScheduler(1);
        var order = new List<string>();
        var a = new TestJob(0, 1, () => order.Add("a"));
        var b = new TestJob(0, 1, () => order.Add("b"));      // overlaps a: must wait for it
        var c = new TestJob(5, 6, () => order.Add("c"));      // independent
        var flush = new TestJob(0, long.MaxValue, () => order.Add("flush"), JobAccess.Barrier);
        var inline = new List<IoJob>();

        scheduler.Submit([a, b, c, flush], inline);

        Assert.That(inline, Is.EqualTo(new IoJob[] { a, c }), "only jobs nothing earlier blocks are returned to the submitter");
        Assert.That(order, Is.Empty, "nothing ran on the IO thread while a and c are unfinished");
        scheduler.Execute(a);
        scheduler.Execute(c);
        var done = new ManualResetEventSlim();
        scheduler.Submit(new TestJob(0, long.MaxValue, done.Set, JobAccess.Barrier));
        scheduler.Finish(a);
        scheduler.Finish(c);
        Assert.That(done.Wait(TimeSpan.FromSeconds(10)), Is.True);
        lock (order)
        {
            Assert.That(order, Is.EqualTo(new[] { "a", "c", "b", "flush" }));
        }
    }

    [Test]
    public async Task Jobs_submitted_to_idle_io_threads_all_run()
    {
        using var scheduler = new JobScheduler(2);
        int ran = 0;
        var all = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        for (int round = 0; round < 50; round++)
        {
            // Threads are idle (waiting) between rounds: each batch must wake enough of them.
            var batch = Enumerable.Range(0, 8).Select(i => (IoJob)new TestJob(i, i + 1, () =>
            {
                if (Interlocked.Increment(ref ran) == 400)
                {
                    all.SetResult();
                }
            })).ToList();
            scheduler.Submit(batch, null);
        }
        await all.Task.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.That(ran, Is.EqualTo(400));
    }

    [Test]
    public async Task A_job_that_throws_is_logged_and_the_io_thread_runs_the_next_jobs()
    {
        var log = new ListLogger();
        using var throttle = new LogThrottle(log, TimeSpan.FromSeconds(5));
        using var scheduler = new JobScheduler(1, throttle);
        var ran = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        scheduler.Submit(new TestJob(0, 1, () => throw new IndexOutOfRangeException("a bug")));
        // Same blocks: it depends on the failed job, so it only runs if that one was finished properly.
        scheduler.Submit(new TestJob(0, 1, ran.SetResult));
        await ran.Task.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.That(log.Lines, Has.One.Contains("a bug"));
    }
}
