using NbdServer.Frontend.Server;

namespace NbdServer.Frontend.Tests;

[CancelAfter(10_000)]
public sealed class ByteBudgetTests
{
    [Test]
    public async Task A_waiter_cancelled_at_the_head_of_the_queue_lets_the_ones_behind_it_in_at_once()
    {
        // A connection asking for more than is free is closed while it waits (its client went away):
        // another connection's small request queued behind it fits and must not wait for a release.
        var budget = new ByteBudget(10);
        await budget.AcquireAsync(8, CancellationToken.None);
        using var closed = new CancellationTokenSource();
        Task big = budget.AcquireAsync(5, closed.Token).AsTask();
        Task small = budget.AcquireAsync(2, CancellationToken.None).AsTask();
        Assert.That((big.IsCompleted, small.IsCompleted), Is.EqualTo((false, false)), "FIFO: the small one queues behind the big one");

        await closed.CancelAsync();

        Assert.That(async () => await big, Throws.InstanceOf<OperationCanceledException>());
        await small.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.That(budget.InUse, Is.EqualTo(10));
    }
}

[CancelAfter(10_000)]
public sealed class FrontendLimitTests
{
    [Test]
    public void A_payload_timeout_the_timers_cannot_take_is_refused_at_start()
    {
        // 100 days passes "positive", but a timer takes at most ~49 days: every WRITE would then fail.
        var options = new FrontendOptions { PayloadTimeout = TimeSpan.FromDays(100) };
        Assert.That(options.Validate, Throws.ArgumentException.With.Message.Contains(nameof(FrontendOptions.PayloadTimeout)));
    }

    [Test]
    public void A_block_status_extent_limit_whose_reply_size_overflows_is_refused_at_start()
    {
        var options = new FrontendOptions { MaxBlockStatusExtents = int.MaxValue };
        Assert.That(options.Validate, Throws.ArgumentException.With.Message.Contains(nameof(FrontendOptions.MaxBlockStatusExtents)));
    }
}
