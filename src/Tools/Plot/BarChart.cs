using System.Globalization;
using ScottPlot;

namespace NbdServer.Tools.Plotting;

/// <summary>
/// A benchmark comparison: one panel per unit (IOPS, MiB/s, seconds ...), in each panel one cluster
/// of bars per workload, one bar per server; a server keeps its colour in every panel, and every bar
/// carries its value so the picture can be read without the table.
/// </summary>
internal static class BarChart
{
    /// <summary>More panels than this do not fit side by side in a document's width.</summary>
    public const int MaxPanels = 6;

    private static readonly Color[] SeriesColors =
    [
        new(0x1f, 0x77, 0xb4), new(0xff, 0x7f, 0x0e), new(0x2c, 0xa0, 0x2c), new(0x94, 0x67, 0xbd),
        new(0x8c, 0x56, 0x4b), new(0xe3, 0x77, 0xc2), new(0x7f, 0x7f, 0x7f), new(0xbc, 0xbd, 0x22),
    ];

    public static bool TryBuild(IReadOnlyList<BarValue> values, out Multiplot? chart, out string? error)
    {
        chart = null;
        List<string> panels = values.Select(v => v.Panel).Distinct().ToList();
        List<string> series = values.Select(v => v.Series).Distinct().ToList();
        if (panels.Count > MaxPanels)
        {
            error = $"{panels.Count} panels; at most {MaxPanels} fit one picture";
            return false;
        }
        if (series.Count > SeriesColors.Length)
        {
            error = $"{series.Count} series; at most {SeriesColors.Length} can be told apart";
            return false;
        }
        error = null;
        var mp = new Multiplot();
        mp.AddPlots(panels.Count);
        mp.Layout = new ScottPlot.MultiplotLayouts.Columns();
        for (int p = 0; p < panels.Count; p++)
        {
            Plot plot = mp.GetPlot(p);
            List<BarValue> mine = values.Where(v => v.Panel == panels[p]).ToList();
            List<string> groups = mine.Select(v => v.Group).Distinct().ToList();
            // Clusters one bar wider than the number of series: the gap tells the workloads apart.
            int stride = series.Count + 1;
            var ticks = new List<Tick>();
            foreach ((string group, int g) in groups.Select((x, i) => (x, i)))
            {
                foreach (BarValue v in mine.Where(v => v.Group == group))
                {
                    int s = series.IndexOf(v.Series);
                    var bar = plot.Add.Bar(new Bar
                    {
                        Position = g * stride + s,
                        Value = v.Value,
                        FillColor = SeriesColors[s],
                        Label = Format(v.Value),
                    });
                    bar.ValueLabelStyle.FontSize = 10;
                }
                ticks.Add(new Tick(g * stride + (series.Count - 1) / 2.0, group));
            }
            plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(ticks.ToArray());
            plot.Axes.Bottom.MajorTickStyle.Length = 0;
            plot.Axes.Title.Label.Text = panels[p];
            plot.Axes.Title.Label.FontSize = 13;
            plot.Axes.SetLimitsX(-0.75, groups.Count * stride - 1.25);
            // Head room for the value labels, and in the first panel for the legend above the bars.
            double headroom = p == 0 ? 1.2 + 0.09 * series.Count : 1.12;
            plot.Axes.SetLimitsY(0, Math.Max(1e-9, mine.Max(v => v.Value)) * headroom);
            plot.HideGrid();
            if (p == 0)
            {
                foreach ((string s, int i) in series.Select((x, i) => (x, i)))
                {
                    plot.Legend.ManualItems.Add(new LegendItem { LabelText = s, FillColor = SeriesColors[i] });
                }
                plot.Legend.IsVisible = true;
                plot.Legend.Alignment = Alignment.UpperLeft;
                plot.Legend.FontSize = 11;
            }
        }
        chart = mp;
        return true;
    }

    private static string Format(double v) => v switch
    {
        >= 100 => v.ToString("F0", CultureInfo.InvariantCulture),
        >= 10 => v.ToString("F1", CultureInfo.InvariantCulture),
        _ => v.ToString("0.##", CultureInfo.InvariantCulture),
    };
}
