using ScottPlot;

namespace NbdServer.Tools.Plotting;

/// <summary>A stretch of the time axis, in the timeline's seconds.</summary>
internal readonly record struct TimeSpan2(double Start, double End);

/// <summary>A moment worth a line of its own (e.g. "replica faulted").</summary>
internal readonly record struct TimeEvent(double At, string Label);

internal sealed record TimelineMarks(
    IReadOnlyList<TimeSpan2> Faults,
    IReadOnlyList<TimeSpan2> Repairs,
    IReadOnlyList<TimeEvent> Events,
    string Title,
    string XLabel);

/// <summary>
/// An incident's timeline: the guest's completed IOs per second on top, the longest IO of each second
/// below, on one time axis; each fault window shaded red, each repair shaded green between a dashed
/// start and end line. Someone reading the picture should see at once whether IO dipped, for how long,
/// and whether it came back before, with or after the repair.
/// </summary>
internal static class TimelineChart
{
    public static readonly Color FaultColor = Colors.Red.WithAlpha(0.16);
    public static readonly Color RepairColor = Colors.Green.WithAlpha(0.12);
    private static readonly Color IopsColor = new(0x1f, 0x77, 0xb4);
    private static readonly Color LatencyColor = new(0xd6, 0x5f, 0x00);
    private static readonly Color ProbeColor = new(0x6a, 0x3d, 0x9a);
    private static readonly Color RepairLineColor = new(0x2c, 0x8c, 0x2c);

    /// <summary>Same left-axis width on both panels, so their time axes line up.</summary>
    private const float LeftAxisPixels = 70;

    /// <summary>Right-axis width on both panels when the top one carries the error axis.</summary>
    private const float RightAxisPixels = 55;

    public static Multiplot Build(IReadOnlyList<TimelinePoint> points, TimelineMarks marks)
    {
        var mp = new Multiplot();
        mp.AddPlots(2);
        mp.Layout = new ScottPlot.MultiplotLayouts.Rows();
        Plot top = mp.GetPlot(0), bottom = mp.GetPlot(1);

        double[] xs = points.Select(p => p.Seconds).ToArray();
        double xMin = xs[0] - 0.5, xMax = xs[^1] + 0.5;
        foreach (TimeSpan2 f in marks.Faults.Concat(marks.Repairs))
        {
            xMin = Math.Min(xMin, f.Start - 0.5);
            xMax = Math.Max(xMax, f.End + 0.5);
        }

        foreach (Plot plot in new[] { top, bottom })
        {
            foreach (TimeSpan2 f in marks.Faults)
            {
                var span = plot.Add.HorizontalSpan(f.Start, f.End, FaultColor);
                span.LineWidth = 0;
            }
            foreach (TimeSpan2 r in marks.Repairs)
            {
                var span = plot.Add.HorizontalSpan(r.Start, r.End, RepairColor);
                span.LineWidth = 0;
                foreach (double x in new[] { r.Start, r.End })
                {
                    var line = plot.Add.VerticalLine(x, 1.5f, RepairLineColor);
                    line.LinePattern = LinePattern.Dashed;
                }
            }
            foreach (TimeEvent e in marks.Events)
            {
                var line = plot.Add.VerticalLine(e.At, 1.5f, Colors.DarkRed);
                line.LinePattern = LinePattern.Dotted;
            }
            plot.Axes.Left.MinimumSize = LeftAxisPixels;
            plot.Axes.Left.MaximumSize = LeftAxisPixels;
            plot.Axes.SetLimitsX(xMin, xMax);
        }

        var iops = top.Add.ScatterLine(xs, points.Select(p => p.Iops).ToArray(), IopsColor);
        iops.LineWidth = 2;
        iops.MarkerSize = 4;
        iops.LegendText = "IOs completed per second";
        double iopsMax = points.Max(p => p.Iops);
        TimelinePoint[] probe = points.Where(p => !double.IsNaN(p.ProbeIops)).ToArray();
        if (probe.Length > 0)
        {
            var reads = top.Add.ScatterLine(probe.Select(p => p.Seconds).ToArray(), probe.Select(p => p.ProbeIops).ToArray(), ProbeColor);
            reads.LineWidth = 2;
            reads.MarkerSize = 4;
            reads.LinePattern = LinePattern.Dashed;
            reads.LegendText = "read probe's IOs per second";
            iopsMax = Math.Max(iopsMax, probe.Max(p => p.ProbeIops));
        }
        TimelinePoint[] failed = points.Where(p => p.Errors > 0).ToArray();
        if (failed.Length > 0)
        {
            // Errors are a handful per second against thousands of IOs: their own axis, on the right.
            var errors = top.Add.ScatterPoints(failed.Select(p => p.Seconds).ToArray(), failed.Select(p => p.Errors).ToArray(), Colors.Red);
            errors.MarkerSize = 7;
            errors.MarkerShape = MarkerShape.FilledDiamond;
            errors.LegendText = "IO errors per second (right axis)";
            errors.Axes.YAxis = top.Axes.Right;
            top.Axes.Right.Label.Text = "errors";
            top.Axes.SetLimitsY(0, failed.Max(p => p.Errors) * 1.15, top.Axes.Right);
            foreach (Plot plot in new[] { top, bottom })
            {
                plot.Axes.Right.MinimumSize = RightAxisPixels;
                plot.Axes.Right.MaximumSize = RightAxisPixels;
            }
        }
        top.Axes.SetLimitsY(0, Math.Max(1, iopsMax) * 1.15);
        top.Axes.Left.Label.Text = "IOPS";

        var lat = bottom.Add.ScatterLine(xs, points.Select(p => p.LatencyMs).ToArray(), LatencyColor);
        lat.LineWidth = 2;
        lat.MarkerSize = 4;
        lat.LegendText = "longest IO of the second, ms";
        bottom.Axes.SetLimitsY(0, Math.Max(1, points.Max(p => p.LatencyMs)) * 1.15);
        bottom.Axes.Left.Label.Text = "latency ms";
        bottom.Axes.Bottom.Label.Text = marks.XLabel;

        // The legend names the shading once, on the top panel.
        if (marks.Faults.Count > 0)
        {
            top.Legend.ManualItems.Add(new LegendItem { LabelText = "fault injected", FillColor = FaultColor.WithAlpha(0.4) });
        }
        if (marks.Repairs.Count > 0)
        {
            top.Legend.ManualItems.Add(new LegendItem { LabelText = "live repair", FillColor = RepairColor.WithAlpha(0.4) });
        }
        foreach (string label in marks.Events.Select(e => e.Label).Distinct())
        {
            top.Legend.ManualItems.Add(new LegendItem { LabelText = label, LineColor = Colors.DarkRed, LineWidth = 1.5f, LinePattern = LinePattern.Dotted });
        }
        // One legend for both panels, above them: a legend inside would hide the seconds under it.
        top.Legend.ManualItems.Insert(0, new LegendItem { LabelText = lat.LegendText, LineColor = LatencyColor, LineWidth = 2 });
        lat.LegendText = "";
        bottom.Legend.IsVisible = false;
        top.ShowLegend(Edge.Top);
        top.Legend.TightHorizontalWrapping = true;
        top.Legend.FontSize = 11;
        top.Legend.Margin = new PixelPadding(0);
        return mp;
    }
}
